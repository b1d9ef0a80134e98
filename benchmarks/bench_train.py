"""Training throughput of the engine: CE step vs BAN step (same-size teacher), img/s.

Times whole epochs of ``ban_analysis.engine.loop.train_generation`` (data path, forward, objective,
backward, SGD step; no evaluation is timed), so it measures what a run pays. The BAN step adds
the teacher: with ``augment = "none"`` its logits are computed once per generation (counted
here, amortised over the epochs), with augmentation it runs a forward per step in eval mode.

    BAN_DATA=../shared/data python benchmarks/bench_train.py [--epochs 2] [--threads 2]

Goal: BAN img/s / CE img/s slowdown <= 1.30 for the MLP and a CIFAR ResNet-20.
The last columns time the BAN step again with the studies' hook set (logit_split every step,
update_share every 25 steps, param_split every 50 steps on 32 samples; fused backward), the
amortised cost of instrumentation in a real run (goal: <= 10%).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import time

import torch

from ban_analysis.config import TrainConfig
from ban_analysis.data import load_dataset
from ban_analysis.losses import get_objective
from ban_analysis.engine.chain import freeze
from ban_analysis.engine.loop import build_model
from ban_analysis.engine.loop import train_generation

SETTINGS = {
    # name: (dataset, train_subset, arch, params, augment)
    "mlp / fashion_mnist": ("fashion_mnist", 0, "mlp", {"widths": [256, 256]}, "none"),
    "resnet20 / cifar100 (crop+flip)": ("cifar100", 2560, "resnet20", {}, "crop_flip"),
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


# the hook set the study configs use (experiments/study_fmnist_mlp.toml)
STUDY_HOOKS = {"logit_split": {"every_n_steps": 1}, "update_share": {"every_n_steps": 25},
               "param_split": {"every_n_steps": 50, "samples": 32, "mode": "contribution"}}


def time_generation(bundle, arch, params, objective_name, teacher, epochs, augment, hooks=None) -> float:
    """Seconds for ``epochs`` epochs of training (teacher caching included), no run folder."""
    cfg = TrainConfig(epochs=epochs, lr=0.05, schedule="constant")
    model = build_model(arch, params, bundle, seed=0, gen=1)
    objective = get_objective(objective_name)
    # evaluation on an empty val split costs nothing: time training only
    bundle_no_eval = dataclasses.replace(bundle, val=dataclasses.replace(bundle.val, x=bundle.val.x[:0],
                                                                        y=bundle.val.y[:0],
                                                                        index=bundle.val.index[:0]),
                                         test=dataclasses.replace(bundle.test, x=bundle.test.x[:0],
                                                                  y=bundle.test.y[:0],
                                                                  index=bundle.test.index[:0]))
    runner = None
    if hooks:
        from ban_analysis.instrument.hooks import HookRunner

        runner = HookRunner(hooks, seed=0, train_size=len(bundle.train.index), train_index=bundle.train.index,
                            fuse_backward=True)
    start = time.perf_counter()
    train_generation(model, objective, bundle_no_eval, cfg, gen=1, seed=0, hooks=runner,
                     teacher=teacher if objective.needs_teacher else None, augment=augment, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", default=None, help="substring of a setting name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print("| setting | images/epoch | CE img/s | BAN img/s | BAN / CE time | BAN + study hooks img/s | hooks overhead |")
    print("|---|---|---|---|---|---|---|")
    for name, (dataset, subset, arch, params, augment) in SETTINGS.items():
        if args.only and args.only not in name:
            continue
        bundle = load_dataset(dataset, val_size=0, train_subset=subset)
        teacher = freeze(build_model(arch, params, bundle, seed=0, gen=0))
        n = len(bundle.train.y) * args.epochs
        time_generation(bundle, arch, params, "ce", None, 1, augment)  # warm-up (allocator, kernels)
        ce = time_generation(bundle, arch, params, "ce", None, args.epochs, augment)
        ban = time_generation(bundle, arch, params, "ban", teacher, args.epochs, augment)
        hooked = time_generation(bundle, arch, params, "ban", teacher, args.epochs, augment, STUDY_HOOKS)
        print(f"| {name} | {len(bundle.train.y)} | {n / ce:,.0f} | {n / ban:,.0f} | {ban / ce:.2f} | "
              f"{n / hooked:,.0f} | {100 * (hooked / ban - 1):+.0f}% |")


if __name__ == "__main__":
    main()
