"""The paired measurement of the hook overhead: arms that differ in the hook runner only, on one model.

Shared by ``bench_train.py --sections paired`` (the study hook set against plain BAN steps) and
``bench_hook_parts.py`` (the same, each call timed). Moved out of ``bench_train.py``.
"""

from __future__ import annotations

import statistics
import time

import torch

from ban_analysis.config import TrainConfig
from ban_analysis.engine.chain import freeze
from ban_analysis.engine.loop import build_model
from ban_analysis.losses import get_objective

# the hook set the study configs use (experiments/study_fmnist_mlp.toml): logit_split and head_split
# on a fixed 5,000-sample subset every step, update_share every 25 steps, param_split every 50
STUDY_HOOKS = {"logit_split": {"every_n_steps": 1, "samples": 5000},
               "head_split": {"every_n_steps": 1, "samples": 5000},
               "update_share": {"every_n_steps": 25},
               "param_split": {"every_n_steps": 50, "samples": 32, "mode": "contribution"}}
PAIRED_BLOCK = 430  # steps of one Fashion-MNIST epoch at batch 128 (55,000 training images)
PAIRED_SLICE = 43  # steps an arm runs before the next arm's turn (a tenth of an epoch)


def paired_hooks(bundle, arch, params, rounds: int, block: int = PAIRED_BLOCK,
                 slice_steps: int = PAIRED_SLICE, arms: dict | None = None, on_step=None,
                 on_round=None, objective=None, prepare=None) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per block of ``block`` BAN steps, one list per arm, interleaved in one process.

    Arms (``arms``: name -> hook runner or None; ``bench_hook_parts.py`` passes its own; default:
    these four): ``plain`` (no hooks), ``plain (again)`` (the same, a second time: its ratio to ``plain``
    is this run's noise floor), ``immediate`` (the study hook set, columns computed at each step)
    and, where the runner supports it, ``deferred`` (``HookRunner(defer=True)``, what ``run_chain``
    uses: per-sample statistics computed in one call over the buffered rows).

    All arms train one model with one optimizer, so they differ in the hook runner only. With a
    model copy per arm, two plain arms differed by up to 9% in one run (median block ratios 0.908
    to 1.038 over three runs, 2026-12-02, AMD EPYC; why a copy runs faster or slower was not
    found). A block is one epoch's worth of steps (430 at batch 128 on Fashion-MNIST's 55,000
    training images), which each arm runs in slices of ``slice_steps`` taking turns in a rotating
    order, so drift in the machine's speed falls on all arms alike (two plain arms: 0.980 to
    1.010). Each arm counts its own steps, so its runner sees an epoch's consecutive steps, as in a
    run. A hooked arm's block includes handing the rows to a ``HookWriter`` (in memory; no
    Parquet) and, at the block's end, ``hooks.flush()``, as ``train_generation`` does at an epoch's
    end. Teacher logits are cached, as ``augment = "none"`` does.

    ``on_round(r)`` is called as round ``r`` starts (0 warms up and is not in the result), and
    ``on_step(arm, r, step, seconds, result)`` after each step with its wall seconds (the step and
    its rows handed to the writer). ``objective``: the BAN objective, or a stand-in with its protocol
    (``bench_step_anatomy.py`` times its calls); ``prepare(model, optimizer)`` is called once they exist.
    """
    import inspect

    from ban_analysis.data import iterate_batches
    from ban_analysis.engine.loop import make_optimizer, predict
    from ban_analysis.engine.runs import HookWriter
    from ban_analysis.engine.step import train_step
    from ban_analysis.instrument.hooks import HookRunner

    cfg = TrainConfig(lr=0.05, schedule="constant")
    teacher = freeze(build_model(arch, params, bundle, seed=0, gen=0))
    teacher_logits = predict(teacher, bundle.train, bundle, 1024)
    row_of = torch.full((int(bundle.train.index.max()) + 1,), -1, dtype=torch.long)
    row_of[bundle.train.index] = torch.arange(len(bundle.train.index))
    objective = get_objective("ban") if objective is None else objective
    model = build_model(arch, params, bundle, seed=0, gen=1)
    optimizer = make_optimizer(model, cfg)
    if prepare is not None:
        prepare(model, optimizer)
    runners = arms
    if runners is None:
        can_defer = "defer" in inspect.signature(HookRunner).parameters
        runners = {"plain": None, "plain (again)": None}
        for arm in ["immediate"] + (["deferred"] if can_defer else []):
            kwargs = {"defer": arm == "deferred"} if can_defer else {}
            runners[arm] = HookRunner(STUDY_HOOKS, seed=0, train_size=len(bundle.train.index),
                                      train_index=bundle.train.index, fuse_backward=True, **kwargs)
    arms = list(runners)
    writers = {arm: HookWriter(None, 1) for arm in arms}
    steps = dict.fromkeys(arms, 0)
    times = {arm: [] for arm in arms}
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield from iterate_batches(bundle.train, cfg.batch_size, shuffle=True, generator=g, augment="none",
                                       mean=bundle.mean, std=bundle.std)

    source = batches()
    for r in range(rounds + 1):  # round 0 warms up
        if on_round is not None:
            on_round(r)
        chunk = [next(source) for _ in range(block)]
        spent = {arm: [0.0, 0.0] for arm in arms}
        for k, lo in enumerate(range(0, block, slice_steps)):
            shift = (r + k) % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                runner, writer = runners[arm], writers[arm]
                start, cpu = time.perf_counter(), time.process_time()
                for x, y, index in chunk[lo:lo + slice_steps]:
                    step = steps[arm]
                    steps[arm] += 1
                    began = time.perf_counter()
                    res = train_step(model, objective, x, y, optimizer, teacher_logits=teacher_logits[row_of[index]],
                                     hooks=runner, step=step, gen=1, epoch=0, sample_index=index)
                    if res.hook_rows:
                        writer.add(0, step, res.hook_rows)
                    if on_step is not None:
                        on_step(arm, r, step, time.perf_counter() - began, res)
                if lo + slice_steps >= block and runner is not None and hasattr(runner, "flush"):
                    rows = runner.flush()  # the epoch's end
                    if rows:
                        writer.add(0, step, rows)
                spent[arm][0] += time.perf_counter() - start
                spent[arm][1] += time.process_time() - cpu
        for arm in arms:
            writers[arm]._buffers.clear()
            if r:
                times[arm].append(tuple(spent[arm]))
    return times


def median_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """The distribution-free CI of the blocks' median: ``scipy.stats.quantile_test``'s, between two order
    statistics (blocks below the median are Binomial(n, 1/2); at 16 blocks the 4th and the 13th, 97.9%)."""
    from scipy.stats import quantile_test

    ci = quantile_test(values, q=statistics.median(values), p=0.5).confidence_interval(confidence)
    return float(ci.low), float(ci.high)
