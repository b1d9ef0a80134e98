"""Where the study hook set's time goes, phase by phase, on the quick experiment's MLP.

``bench_train.py --sections paired`` gives the study hook set's overhead as one number; this script
says which calls it is made of. It uses ``paired``'s measurement (``paired.paired_hooks``: one shared
model, 43-step slices of one-epoch blocks) with two arms: ``plain`` (no hooks) and ``deferred`` (the
study hook set of ``paired.STUDY_HOOKS``, fused backward, deferred per-sample statistics, as ``run_chain`` runs
it, rows handed to an in-memory ``HookWriter`` and ``flush()`` at each block's end). In the hooked
arm every ``HookRunner`` call, and the hooks' pieces inside them, is wrapped in a timer. Printed:
per part, calls per epoch, the median microseconds a call, the microseconds a step averaged over
the epoch and that as a share of the plain step; then the sum of the runner's calls against the
hooked arm's measured excess over the plain one (what the wrappers do not see: the StepContext,
the writer, a slower plain part).

Then the same split by kind of step: for the hooked arm's keep steps (only logit_split and
head_split due), its periodic steps (update_share or param_split due) and the first steps after a
flush, the median step time, the median time in the runner's calls, and the rest of the step
against a plain step: what the hooks cost a step outside their own calls.

A timer costs itself a fraction of a microsecond a call (0.2-0.5 us here, 2026-12-02; printed); the
nested rows are inside their parents, so only the top-level rows add up.

Section ``keep-forms`` (``--sections parts,keep-forms``): what a step pays for each way of keeping
its small tensors for later (ids, labels, student and teacher logits, logit gradient, sample
weights: what logit_split keeps), with a stand-in runner whose ``keep`` only does that: ``noop``
(the keep path's calls, nothing kept), ``refs`` (references in a list, as ``DeferredRows`` does),
``copy`` (each tensor copied into a buffer made once per epoch), ``cat`` (one ``torch.cat(out=)``
for the float tensors and one ``torch.stack(out=)`` for the ids and labels).

Section ``settings`` (``--sections settings``): the study hook set against variants a study could
choose instead, each a ``HookRunner`` arm of the same paired measurement (median block ratio over
``plain`` and its 95% CI): ``defer_bytes`` of 1 MiB (the kept steps computed every ~60 steps instead of
once an epoch), ``update_share`` every 50 steps instead of 25, and the set without ``param_split``.

    BAN_DATA=../shared/data python benchmarks/bench_hook_parts.py [--threads 1] [--rounds 4] [--sections parts]
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
from paired import PAIRED_BLOCK, STUDY_HOOKS, median_ci, paired_hooks
from ban_analysis.data import load_dataset
from ban_analysis.engine.runs import HookWriter
from ban_analysis.instrument import deferred, hooks, param_grads, runner


class _Proxy:
    """A module seen through one attribute lookup, so that one module's calls of a torch function can be
    timed without timing everyone's (an attribute set on the proxy shadows the module's)."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def parts_to_time() -> list[tuple[str, object, str, int]]:
    """(label, owner, attribute, depth) of the parts; depth 0 are the runner's calls (they add up to the
    hooks' cost), the others are inside them. The parts :func:`main` wraps in timers. Installs the proxies first (so importing this script
    changes nothing): DeferredRows' ``torch.cat`` and HeadSplit's ``torch.linalg.vector_norm`` are then
    looked up on them, and only those modules' calls are timed."""
    deferred.torch = _Proxy(torch)  # DeferredRows' torch.cat: the concatenation of the kept step tensors
    hooks.torch = _Proxy(torch)
    hooks.torch.linalg = _Proxy(torch.linalg)  # HeadSplit.gather's norm of the head input
    return [
        ("idle", runner.HookRunner, "idle", 0),
        ("keeps_only", runner.HookRunner, "keeps_only", 0),
        ("keep (the steps where only logit_split + head_split are due)", runner.HookRunner, "keep", 0),
        ("logit_split gather", hooks.LogitSplit, "gather", 1),
        ("head_split gather", hooks.HeadSplit, "gather", 1),
        ("head input read from the logits' graph", hooks.HeadSplit, "_graph_input", 2),
        ("norm of the head input (vector_norm)", hooks.torch.linalg, "vector_norm", 2),
        ("capture", runner.HookRunner, "capture", 0),
        ("run (the 17-18 steps an epoch where update_share or param_split is due)", runner.HookRunner, "run", 0),
        ("update_share: the target term's backward", hooks.UpdateShare, "__call__", 1),
        ("param_split: set-up", hooks.ParamSplit, "__call__", 1),
        ("after_backward", runner.HookRunner, "after_backward", 0),
        ("update_share after_backward", hooks.UpdateShare, "after_backward", 1),
        ("update_share_stats", param_grads, "update_share_stats", 2),
        ("param_split after_backward", hooks.ParamSplit, "after_backward", 1),
        ("after_step", runner.HookRunner, "after_step", 0),
        (FLUSH, runner.HookRunner, "flush", 0),
        ("compute_group (select the rows, compute, to CPU)", deferred.DeferredRows, "_compute_group", 1),
        ("torch.cat of the kept step tensors", deferred.torch, "cat", 2),
        ("logit_split compute", hooks.LogitSplit, "compute", 2),
        ("head_split compute", hooks.HeadSplit, "compute", 2),
        ("HookWriter.add", HookWriter, "add", 0),
    ]


PARTS: list = []  # filled by main (parts_to_time)
WRITER, FLUSH = "HookWriter.add", "flush (once an epoch)"
spent: dict[str, list[float]] = collections.defaultdict(list)  # label -> seconds of each call
in_calls = [0.0]  # seconds in the runner's calls made within steps (so not flush), all steps so far


def wrap(label: str, owner, attr: str, in_step: bool) -> None:
    """Time each call of ``owner.attr`` into ``spent[label]`` (and ``in_calls`` if ``in_step``). Only
    the hooked arm calls what is wrapped: a plain step calls no hook runner, and hands no rows to the
    writer."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            took = time.perf_counter() - start
            spent[label].append(took)
            if in_step:
                in_calls[0] += took

    setattr(owner, attr, timed)


def timer_cost(n: int = 20000) -> float:
    """Seconds a wrapper adds to one call (an empty method, wrapped against bare)."""
    class Empty:
        def f(self):
            return None

    bare = min(_loop(Empty().f, n) for _ in range(3))
    wrap("(timer)", Empty, "f", in_step=False)
    wrapped = min(_loop(Empty().f, n) for _ in range(3))
    spent.pop("(timer)", None)
    return (wrapped - bare) / n


def _loop(f, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        f()
    return time.perf_counter() - start


def clear_at_first_measured_round(r: int) -> None:
    if r == 1:  # the warm-up round's calls are not counted
        spent.clear()


def wall_blocks(times: dict) -> dict[str, list[float]]:
    return {arm: [wall for wall, _ in t] for arm, t in times.items()}


def overhead(blocks: dict, arm: str) -> float:
    """The median block ratio of ``arm`` over ``plain``, minus 1."""
    return statistics.median(a / b for a, b in zip(blocks[arm], blocks["plain"])) - 1


def parts(bundle, rounds: int, per_timer: float) -> None:
    hook_runner = runner.HookRunner(STUDY_HOOKS, seed=0, train_size=len(bundle.train.index),
                                    train_index=bundle.train.index, fuse_backward=True, defer=True)
    every = {name: r.every_n_steps for name, r in hook_runner.hooks.items() if r.every_n_steps > 1}
    by_kind = collections.defaultdict(list)  # kind of step -> (seconds, seconds in the runner's calls)
    seen = [0.0]  # in_calls after the previous step

    def on_step(arm, r, step, seconds, res):
        calls, seen[0] = in_calls[0] - seen[0], in_calls[0]
        if not r:
            return
        if arm == "plain":
            kind = "plain step (the plain arm)"
        elif step % PAIRED_BLOCK < 5:
            kind = "the first 5 steps after a flush"
        elif any(step % n == 0 for n in every.values()):
            kind = "periodic (" + " or ".join(every) + " due)"
        else:
            kind = "keep (only logit_split + head_split due)"
        by_kind[kind].append((seconds, calls))

    blocks = wall_blocks(paired_hooks(bundle, "mlp", {"widths": [256, 256]}, rounds,
                                      arms={"plain": None, "deferred": hook_runner}, on_step=on_step,
                                      on_round=clear_at_first_measured_round))
    plain_us = 1e6 * statistics.median(blocks["plain"]) / PAIRED_BLOCK
    excess_us = overhead(blocks, "deferred") * plain_us
    n_steps = rounds * PAIRED_BLOCK
    print(f"\nplain step {plain_us:.0f} us (median of {rounds} one-epoch blocks); the hooked arm: "
          f"{100 * overhead(blocks, 'deferred'):+.1f}% (median block ratio) = {excess_us:+.0f} us a step; "
          f"a timer adds {1e6 * per_timer:.2f} us a call\n")
    print("| part | calls an epoch | us a call (median) | us a step (averaged) | share of the plain step |")
    print("|---|---|---|---|---|")
    top = 0.0
    for label, _, _, depth in PARTS:
        calls = spent.get(label, [])
        if not calls:
            continue
        per_step = 1e6 * sum(calls) / n_steps
        top += per_step if depth == 0 else 0.0
        name = "&nbsp;&nbsp;" * 2 * depth + ("- " if depth else "") + label
        print(f"| {name} | {len(calls) / rounds:.0f} | {1e6 * statistics.median(calls):.1f} | {per_step:.1f} | "
              f"{100 * per_step / plain_us:.2f}% |")
    print(f"| **the runner's calls and the writer, together** | | | **{top:.0f}** | **{100 * top / plain_us:.1f}%** |")
    print(f"| the hooked arm's measured excess (median block ratio) | | | {excess_us:.0f} | "
          f"{100 * excess_us / plain_us:.1f}% |")
    plain_step = statistics.median(s for s, _ in by_kind["plain step (the plain arm)"])
    print("\n| kind of step | steps | median step, us | median in the runner's calls, us | "
          "median of the rest, us | the rest over a plain step, us |")
    print("|---|---|---|---|---|---|")
    for kind, rows in sorted(by_kind.items()):
        rest = statistics.median(s - c for s, c in rows)
        print(f"| {kind} | {len(rows)} | {1e6 * statistics.median(s for s, _ in rows):.0f} | "
              f"{1e6 * statistics.median(c for _, c in rows):.0f} | {1e6 * rest:.0f} | {1e6 * (rest - plain_step):+.0f} |")


class KeepOnly:
    """A stand-in runner whose every step is a keep step that keeps logit_split's tensors in one way."""

    def __init__(self, form: str) -> None:
        self.form, self.kept, self.buffers, self.at = form, [], None, 0

    def idle(self, step):
        return False

    def keeps_only(self, step, model):
        return True

    def keep(self, ctx):
        out = ctx.out
        tensors = (ctx.sample_index, ctx.target, ctx.student_logits.detach(), out.logit_grad,
                   out.sample_weight, ctx.teacher_logits)
        n = tensors[0].shape[0]
        if self.form == "refs":
            self.kept.append(tensors)
        elif self.form == "copy":
            if self.buffers is None:
                self.buffers = [torch.empty((PAIRED_BLOCK * n, *t.shape[1:]), dtype=t.dtype) for t in tensors]
            for buffer, t in zip(self.buffers, tensors):
                buffer[self.at:self.at + n].copy_(t)
        elif self.form == "cat":
            if self.buffers is None:
                width = sum(t.shape[1] for t in tensors[2:4]) + tensors[5].shape[1] + 1
                self.buffers = [torch.empty((PAIRED_BLOCK * n, width)),
                                torch.empty((PAIRED_BLOCK * n, 2), dtype=torch.long)]
            torch.cat([tensors[2], tensors[3], tensors[5], tensors[4].unsqueeze(1)], dim=1,
                      out=self.buffers[0][self.at:self.at + n])
            torch.stack([tensors[0], tensors[1]], dim=1, out=self.buffers[1][self.at:self.at + n])
        self.at += n
        return {}

    def flush(self):
        self.kept, self.at = [], 0
        return {}


def arms_table(bundle, rounds: int, arms: dict, title: str) -> None:
    """One paired run of ``arms`` (``plain`` among them) and its table: each arm's median block ratio over
    ``plain``, in percent and in microseconds a step, with the distribution-free 95% CI of the median."""
    blocks = wall_blocks(paired_hooks(bundle, "mlp", {"widths": [256, 256]}, rounds, arms=arms))
    plain_us = 1e6 * statistics.median(blocks["plain"]) / PAIRED_BLOCK
    print(f"\n{title} (plain step {plain_us:.0f} us; median block ratio over {rounds} one-epoch blocks)\n")
    print("| arm | over a plain step | us a step | 95% CI |")
    print("|---|---|---|---|")
    for arm in arms:
        ratio = overhead(blocks, arm)
        low, high = median_ci([a / b for a, b in zip(blocks[arm], blocks["plain"])])
        print(f"| {arm} | {100 * ratio:+.1f}% | {ratio * plain_us:+.0f} | {100 * (low - 1):+.1f} to {100 * (high - 1):+.1f}% |")


def keep_forms(bundle, rounds: int) -> None:
    arms = {"plain": None, "plain (again)": None, **{form: KeepOnly(form) for form in ("noop", "refs", "copy", "cat")}}
    arms_table(bundle, rounds, arms, "Ways of keeping a step's small tensors")


def settings(bundle, rounds: int) -> None:
    """The study hook set and the variants of it in the module docstring, as arms of one paired run."""
    variants = {"study set (as run_chain runs it)": (STUDY_HOOKS, {}),
                "defer_bytes 1 MiB": (STUDY_HOOKS, {"defer_bytes": 2**20}),
                "update_share every 50 steps": ({**STUDY_HOOKS, "update_share": {"every_n_steps": 50}}, {}),
                "without param_split": ({k: v for k, v in STUDY_HOOKS.items() if k != "param_split"}, {})}
    arms = {"plain": None, "plain (again)": None}
    for label, (hook_cfgs, kwargs) in variants.items():
        arms[label] = runner.HookRunner(hook_cfgs, seed=0, train_size=len(bundle.train.index),
                                        train_index=bundle.train.index, fuse_backward=True, defer=True, **kwargs)
    arms_table(bundle, rounds, arms, "The study hook set and variants of it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: the default here; 1: a Ray worker)")
    parser.add_argument("--rounds", type=int, default=4, help="measured one-epoch blocks per arm (after one warm-up)")
    parser.add_argument("--sections", default="parts,keep-forms", help="comma-separated: parts, keep-forms, settings")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"parts", "keep-forms", "settings"}
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from parts, keep-forms, settings")
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}")
    bundle = load_dataset("fashion_mnist", val_size=5000)
    if "settings" in sections:  # first: no timers installed yet
        settings(bundle, args.rounds)
    if sections <= {"settings"}:
        return
    per_timer = timer_cost()
    PARTS[:] = parts_to_time()
    for label, owner, attr, depth in PARTS:
        wrap(label, owner, attr, in_step=depth == 0 and label not in (WRITER, FLUSH))
    if "parts" in sections:
        parts(bundle, args.rounds, per_timer)
    if "keep-forms" in sections:
        keep_forms(bundle, args.rounds)


if __name__ == "__main__":
    main()
