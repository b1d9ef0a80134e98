"""Speed of the objectives. Run by hand: ``python benchmarks/bench_objectives.py``.

Prints markdown tables:
1. forward+backward time of every objective against an autograd soft-target cross-entropy
   (``-(softmax(t) * log_softmax(z)).sum(1).mean()``) and ``F.cross_entropy``, B = 128,
   C in {10, 100, 1000};
2. DKPP's vectorised permutation (``permute_dark_knowledge``, with the teacher argmax as
   ``DarkKnowledgePermutedPredictions.compute`` takes it) against a straightforward per-sample
   loop (one ``torch.randperm(C - 1, generator=g)`` per row), both drawing from the generator;
3. each objective's share of a full training step of the quick experiment's model
   (784-256-256-10 MLP, batch 128, SGD with momentum, CPU), measured two ways: the objective's
   own forward+backward time divided by the step time, and the step time with the objective
   minus the step time with ``F.cross_entropy``.

Each table is measured with 1 thread and with the default thread count. Times are medians
of ``torch.utils.benchmark.Timer.blocked_autorange`` (which warms up first). Targets:
every objective <= 1% of the training step, forward+backward at (B=128, C=100) < 2 ms, DKPP
>= 10x faster than the loop at C = 10 and 100 and >= 5x at C = 1000.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from ban_analysis.losses import OBJECTIVES, get_objective
from ban_analysis.losses.dkpp import permute_dark_knowledge, row_argmax
from ban_analysis.models import create_model

B = 128
CLASSES = (10, 100, 1000)


def median_us(fn, min_run_time: float) -> float:
    """Median wall time of ``fn()`` in microseconds (torch.utils.benchmark, warms up first)."""
    fn()  # first-call allocations and lazy init outside the timer too
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def median_cpu_us(fn, min_run_time: float, blocks: int = 7) -> float:
    """Median CPU time of ``fn()`` in microseconds, summed over the process's threads.

    Other processes on the machine stretch wall time while this one waits for a core; CPU
    time does not count that waiting, so it is the steadier number on a shared machine
    (cache and memory-bandwidth contention still show).
    """
    fn()
    fn()
    n = 1
    while True:  # calls per block so that the blocks fill min_run_time together
        start = time.process_time_ns()
        for _ in range(n):
            fn()
        if time.process_time_ns() - start > min_run_time * 1e9 / blocks:
            break
        n *= 2
    per_call = []
    for _ in range(blocks):
        start = time.process_time_ns()
        for _ in range(n):
            fn()
        per_call.append((time.process_time_ns() - start) / n / 1e3)
    return statistics.median(per_call)


def measure(fn, min_run_time: float) -> tuple[float, float]:
    """(wall, cpu) medians in microseconds; cpu is NaN with more than one thread, where
    OpenMP workers spin while waiting and their CPU time says nothing about the work."""
    cpu = median_cpu_us(fn, min_run_time) if torch.get_num_threads() == 1 else math.nan
    return median_us(fn, min_run_time), cpu


def fmt(pair, spec: str = ".0f", unit: str = "") -> str:
    """'wall / cpu' with the NaN cpu of multi-thread runs left out."""
    return " / ".join(f"{v:{spec}}{unit}" for v in pair if not math.isnan(v))


def make_inputs(C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, C, generator=g)).requires_grad_(True)
    teacher = 2 * torch.randn(B, C, generator=g)
    target = torch.randint(0, C, (B,), generator=g)
    return student, teacher, target


def objective_step(name: str, student, teacher, target, g):
    obj = get_objective(name)

    def run():
        student.grad = None
        obj(student, teacher, target, generator=g).loss.backward()

    return run


def baseline_soft_ce(student, teacher, target):
    def run():
        student.grad = None
        p = torch.softmax(teacher, dim=1)
        (-(p * torch.log_softmax(student, dim=1)).sum(1).mean()).backward()

    return run


def baseline_ce(student, teacher, target):
    def run():
        student.grad = None
        F.cross_entropy(student, target).backward()

    return run


def loop_permute(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The straightforward DKPP: one randperm per sample, argmax kept in place."""
    out = p.clone()
    C = p.shape[1]
    for s in range(p.shape[0]):
        a = int(p[s].argmax())
        others = torch.cat([torch.arange(a), torch.arange(a + 1, C)])
        out[s, others] = p[s, others[torch.randperm(C - 1, generator=g)]]
    return out


def vector_permute(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """DKPP's target as the objective builds it: teacher argmax (first maximum), permutation."""
    a = row_argmax(p)
    return permute_dark_knowledge(p, a, a, g)


def table_objectives(min_run_time: float) -> list[str]:
    names = list(OBJECTIVES)
    rows = ["| C | autograd soft CE | F.cross_entropy | " + " | ".join(names) + " |",
            "|---|" + "---|" * (len(names) + 2)]
    for C in CLASSES:
        student, teacher, target = make_inputs(C)
        g = torch.Generator().manual_seed(0)
        cells = [measure(baseline_soft_ce(student, teacher, target), min_run_time),
                 measure(baseline_ce(student, teacher, target), min_run_time)]
        cells += [measure(objective_step(n, student, teacher, target, g), min_run_time) for n in names]
        rows.append(f"| {C} | " + " | ".join(fmt(c) for c in cells) + " |")
    return rows


def table_dkpp(min_run_time: float) -> list[str]:
    rows = ["| C | vectorised | per-sample loop | speed-up (wall / cpu) |", "|---|---|---|---|"]
    for C in CLASSES:
        _, teacher, _ = make_inputs(C)
        p = torch.softmax(teacher, dim=1)
        g = torch.Generator().manual_seed(0)
        vec = measure(lambda: vector_permute(p, g), min_run_time)
        loop = measure(lambda: loop_permute(p, g), min_run_time)
        rows.append(f"| {C} | {fmt(vec)} | {fmt(loop)} | {fmt([a / b for a, b in zip(loop, vec)], '.1f', 'x')} |")
    return rows


def table_training_step(min_run_time: float) -> list[str]:
    torch.manual_seed(0)  # model init only; the timings do not depend on the values
    model = create_model("mlp", num_classes=10, input_shape=(1, 28, 28), widths=[256, 256])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1, 28, 28, generator=g)
    teacher = 2 * torch.randn(B, 10, generator=g)  # precomputed: the teacher forward is not counted
    target = torch.randint(0, 10, (B,), generator=g)

    def step_with(loss_fn):
        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x)).backward()
            opt.step()
        return run

    base = measure(step_with(lambda z: F.cross_entropy(z, target)), min_run_time)
    student, _, _ = make_inputs(10)
    base_alone = measure(baseline_ce(student, teacher, target), min_run_time)
    rows = [f"Training step with `F.cross_entropy`: {fmt(base)} us (wall / cpu); "
            f"`F.cross_entropy` fwd+bwd alone {fmt(base_alone)} us = "
            f"{fmt([100 * a / b for a, b in zip(base_alone, base)], '.1f', '%')} of the step.", "",
            "| objective | fwd+bwd alone (us) | share of step | extra over F.cross_entropy, alone | step (us) | step - CE step |",
            "|---|---|---|---|---|---|"]
    for name in OBJECTIVES:
        obj = get_objective(name)
        alone = measure(objective_step(name, student, teacher, target, g), min_run_time)
        step = measure(step_with(lambda z: obj(z, teacher, target, generator=g).loss), min_run_time)
        share = fmt([100 * a / s for a, s in zip(alone, step)], ".1f", "%")
        extra = fmt([100 * (a - b) / s for a, b, s in zip(alone, base_alone, base)], "+.1f", "%")
        diff = fmt([s - b for s, b in zip(step, base)], "+.0f") + " us"
        rows.append(f"| {name} | {fmt(alone)} | {share} | {extra} | {fmt(step)} | {diff} |")
    return rows


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
            if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--tables", default="objectives,dkpp,step",
                        help="comma-separated subset of objectives,dkpp,step (default: all three)")
    args = parser.parse_args()
    tables = set(args.tables.split(","))
    unknown = tables - {"objectives", "dkpp", "step"}
    if unknown:
        parser.error(f"unknown table(s) {', '.join(sorted(unknown))}; choose from objectives, dkpp, step")
    default_threads = torch.get_num_threads()
    print(f"Machine: {machine()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    print("Cells are `wall / cpu` medians in microseconds (cpu = process CPU time, 1 thread only;"
          " see median_cpu_us).")
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        print(f"\n### {threads} thread(s)")
        if "objectives" in tables:
            print(f"\nForward+backward, B={B}:\n")
            print("\n".join(table_objectives(args.min_run_time)))
        if "dkpp" in tables:
            print(f"\nDKPP permutation (teacher argmax + permutation), B={B}:\n")
            print("\n".join(table_dkpp(args.min_run_time)))
        if "step" in tables:
            print(f"\nShare of a training step (784-256-256-10 MLP, B={B}, SGD momentum, C=10):\n")
            print("\n".join(table_training_step(args.min_run_time)))
    torch.set_num_threads(default_threads)
    print(f"\nLoad average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
