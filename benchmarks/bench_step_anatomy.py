"""The study hook set's cost by kind of step and phase of the step, from per-step medians.

``bench_train.py --sections paired`` gives the overhead as one ratio of one-epoch blocks, whose
95% CI spans about 8 points on this VM; ``bench_hook_parts.py`` times the runner's calls. This
script says where in a step the excess is, per kind of step, with medians over many steps (steadier
than block ratios): the real ``train_step`` runs with the study hook set (deferred, fused backward,
as ``run_chain`` runs it) and without hooks, alternating in 43-step slices on one shared model
(``paired.paired_hooks``), and each phase of a step is timed by wrapping what ``train_step`` calls:

- ``hooks``: the runner's ``idle``, ``keeps_only``, ``capture``, ``run``/``keep``, ``after_backward``
  and ``after_step`` (what the plain arm does not call);
- ``forward``: the model's ``forward`` (an instance attribute, so no module hook is added);
- ``objective``: the objective's ``__call__``;
- ``backward``: ``Tensor.backward``; ``optimizer``: ``optimizer.step`` and ``zero_grad``;
- ``rest``: the step's wall time minus those (``train_step``'s own Python, the checks).

Kinds of hooked steps: ``keep`` (only logit_split and head_split due: the keep path),
``update_share`` (every 25 steps), ``update_share + param_split`` (every 50), ``idle`` (nothing due).
Printed per kind: the median of each phase and its excess over the plain step's, and the excess
times the steps of that kind an epoch; then ``flush`` (once an epoch) and the sum as a share of a
plain epoch. A timer costs 0.2-0.5 us a call (bench_hook_parts.py measures it: 0.23 us on the Xeon VM,
2026-12-05); a keep step makes 8 timed calls, a plain step 5.

``--keep gather`` takes the keep steps apart (the other kinds of step are unchanged): the hooks'
``gather`` calls run and what they return is dropped, so the difference to ``--keep full`` (as
``run_chain`` runs it) is what keeping the step's tensors until the flush costs the steps around it.
The flush then has no logit_split or head_split rows: only the ``full`` flush time is the real one.
(Not gathering at all is no ablation: head_split's gather is where a model's first step finds the head
input in the logits' graph; without it every step takes the capture path.)

    BAN_DATA=../shared/data python benchmarks/bench_step_anatomy.py [--rounds 8] [--threads 2] [--keep full]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import time

import torch

from bench_train import cpu_name
from paired import PAIRED_BLOCK, STUDY_HOOKS, paired_hooks
from ban_analysis.data import load_dataset
from ban_analysis.instrument import runner
from ban_analysis.losses import get_objective

PHASES = ("hooks", "forward", "objective", "backward", "optimizer", "rest")
RUNNER_CALLS = ("idle", "keeps_only", "capture", "run", "keep", "after_backward", "after_step")


class Timers:
    """Seconds spent in each phase since the last :meth:`take`, by wrapping callables."""

    def __init__(self) -> None:
        self.spent = collections.Counter()
        self.flush: list[float] = []
        self._inside: set[str] = set()  # phases being timed: a nested call (keep -> run) is not counted twice

    def wrap(self, phase: str, fn):
        spent, inside = self.spent, self._inside

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if phase in inside:
                return fn(*args, **kwargs)
            inside.add(phase)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - start
                inside.discard(phase)

        return timed

    def take(self) -> dict[str, float]:
        out = dict(self.spent)
        self.spent.clear()
        return out


class TimedObjective:
    """The objective with its calls timed; ``train_step`` takes it as an objective (it has the protocol)."""

    def __init__(self, objective, timers: Timers) -> None:
        self._objective, self.needs_teacher = objective, objective.needs_teacher
        self.name, self.needs_generator = objective.name, getattr(objective, "needs_generator", False)
        self._call = timers.wrap("objective", objective.__call__)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def install(timers: Timers, hook_runner) -> None:
    """Wrap the hooked runner's calls (on the instance: the plain arm has none) and ``Tensor.backward``."""
    for name in RUNNER_CALLS:
        setattr(hook_runner, name, timers.wrap("hooks", getattr(hook_runner, name)))
    torch.Tensor.backward = timers.wrap("backward", torch.Tensor.backward)


def kind_of(hook_runner, step: int) -> str:
    due = hook_runner.due(step)
    if not due:
        return "idle"
    periodic = [n for n in due if hook_runner.hooks[n].every_n_steps > 1]
    return " + ".join(periodic) if periodic else "keep"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="one-epoch rounds (430 steps) per arm")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--keep", choices=("full", "gather"), default="full",
                        help="the keep steps: as run (full), or the hooks' gather calls without keeping")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}, keep steps: {args.keep}\n")
    bundle = load_dataset("fashion_mnist", val_size=5000)
    timers = Timers()
    hook_runner = runner.HookRunner(STUDY_HOOKS, seed=0, train_size=len(bundle.train.index),
                                    train_index=bundle.train.index, fuse_backward=True, defer=True)
    if args.keep != "full":
        _ablate_keep(hook_runner, args.keep)
    flush = hook_runner.flush
    hook_runner.flush = lambda: _timed_flush(flush, timers)
    install(timers, hook_runner)
    steps: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    state = {"round": 0}

    def on_round(r: int) -> None:
        state["round"] = r
        timers.take()
        if r == 1:
            timers.flush.clear()  # the warm-up round's flushes are not counted

    def on_step(arm, r, step, seconds, result) -> None:
        phases = timers.take()
        if not r:
            return
        phases["rest"] = seconds - sum(phases.values())
        steps["plain" if arm == "plain" else kind_of(hook_runner, step)].append(phases)

    objective = TimedObjective(get_objective("ban"), timers)
    paired_hooks(bundle, "mlp", {"widths": [256, 256]}, args.rounds, arms={"plain": None, "hooked": hook_runner},
                 on_step=on_step, on_round=on_round, objective=objective,
                 prepare=lambda model, optimizer: _wrap_model(model, optimizer, timers))
    report(steps, timers.flush, args.rounds)


def _ablate_keep(hook_runner, keep: str) -> None:
    """The runner's deferred rows, on the instance: with ``keep == "gather"`` each due hook's ``gather``
    is called and what it returns dropped (see the module docstring)."""
    rows = hook_runner._deferred
    assert keep == "gather", keep

    def add_step(ctx, items) -> None:
        for name, _ in items:
            rows.hooks[name].hook.gather(ctx)

    rows.add_step = add_step


def _timed_flush(flush, timers: Timers):
    start = time.perf_counter()
    rows = flush()
    timers.flush.append(time.perf_counter() - start)
    timers.spent.clear()  # not a step's
    return rows


def _wrap_model(model, optimizer, timers: Timers) -> None:
    model.forward = timers.wrap("forward", model.forward)
    optimizer.step = timers.wrap("optimizer", optimizer.step)
    optimizer.zero_grad = timers.wrap("optimizer", optimizer.zero_grad)


def report(steps: dict, flushes: list[float], rounds: int) -> None:
    med = {kind: {p: 1e6 * statistics.median(s.get(p, 0.0) for s in rows) for p in PHASES}
           for kind, rows in steps.items()}
    plain = med["plain"]
    plain_step = sum(plain.values())
    print(f"Median microseconds per phase, by kind of step ({rounds} rounds of {PAIRED_BLOCK} steps per arm; "
          f"the hooked arm's excess over the plain step in brackets)\n")
    print("| kind of step | steps an epoch | " + " | ".join(PHASES) + " | step | excess | excess an epoch, ms |")
    print("|---|---|" + "---|" * (len(PHASES) + 3))
    total = 0.0
    for kind, phases in med.items():
        per_epoch = len(steps[kind]) / rounds
        step = sum(phases.values())
        excess = step - plain_step
        cells = [f"{phases[p]:.0f}" if kind == "plain" else f"{phases[p]:.0f} ({phases[p] - plain[p]:+.0f})"
                 for p in PHASES]
        if kind != "plain":
            total += excess * per_epoch / 1e3
        print(f"| {kind} | {per_epoch:.1f} | " + " | ".join(cells) + f" | {step:.0f} | {excess:+.0f} | "
              f"{excess * per_epoch / 1e3 if kind != 'plain' else 0:.1f} |")
    flush_ms = 1e3 * statistics.median(flushes)
    epoch = plain_step * PAIRED_BLOCK / 1e3
    print(f"\nflush (once an epoch): {flush_ms:.1f} ms (median of {len(flushes)}); steps' excess {total:.1f} ms; "
          f"in all {total + flush_ms:.1f} ms an epoch = {100 * (total + flush_ms) / epoch:.1f}% of a plain epoch "
          f"({epoch:.0f} ms)")


if __name__ == "__main__":
    main()
