"""Training throughput of the engine: CE vs BAN step, hook overhead, evaluation, a whole generation.

Sections (``--sections``, all by default):

- ``paired``: the studies' hook set (experiments/study_fmnist_mlp.toml: logit_split and head_split
  on a fixed 5,000-sample subset every step, update_share every 25 steps, param_split every 50 on
  32 rows; fused backward) on the quick experiment's MLP, against plain BAN steps: every arm
  (plain, plain again as the noise floor, per-step hooks, deferred hooks as ``run_chain`` runs
  them) trains one shared model, taking turns in 43-step slices of one-epoch blocks; the median
  block ratio is the overhead, in wall time and in the process's CPU time (steadier on a loaded
  machine: it leaves out the waits for a core), with a distribution-free confidence interval of the
  median block ratio (order statistics; with the default 16 rounds, the 4th to the 13th block). Goal: <= 10%.
- ``train``: whole epochs of ``ban_analysis.engine.loop.train_generation`` (data path, forward,
  objective, backward, SGD step, validation every epoch), split into training and evaluation
  seconds; CE vs BAN (same-size teacher: with ``augment = "none"`` its logits are computed once
  per generation, counted here; with augmentation a forward per step) and BAN with the study
  hooks. Goal: BAN / CE time <= 1.30 for the MLP and a CIFAR ResNet-20.
- ``eval``: img/s of ``predict`` at eval batch sizes 64-1024 for the MLP and ResNet-20, which is
  what ``train.eval_batch_size = 0`` (auto) is chosen from.
- ``generation``: one CIFAR-100 ResNet-20 generation (2,560 training images, 1 epoch, validation
  every epoch, the final test) with ``train_generation`` against a plain PyTorch loop with a
  torchvision-style Dataset through ``torch.utils.data.DataLoader`` at the same batch sizes.

    BAN_DATA=../shared/data python benchmarks/bench_train.py [--sections paired,eval] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import time

import torch

from ban_analysis.config import TrainConfig
from ban_analysis.data import load_dataset
from ban_analysis.losses import get_objective
from ban_analysis.engine.chain import freeze
from ban_analysis.engine.loop import build_model, train_generation
from paired import PAIRED_BLOCK, PAIRED_SLICE, STUDY_HOOKS, median_ci, paired_hooks

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


def time_generation(bundle, arch, params, objective_name, teacher, epochs, augment, hooks=None,
                    eval_batch_size: int = 0) -> tuple[float, float]:
    """(training seconds, evaluation seconds) of ``epochs`` epochs of ``train_generation``, no run folder.

    Training includes the teacher's cached logits; evaluation is what the loop spends predicting:
    the validation split every epoch, the test split at each epoch that improves on the best
    (``track_best``) and the final predictions (reused from the last epoch where it ran).
    Hooks: the runner ``run_chain`` makes (fused backward, deferred per-sample statistics).
    """
    cfg = TrainConfig(epochs=epochs, lr=0.05, schedule="constant", eval_batch_size=eval_batch_size)
    model = build_model(arch, params, bundle, seed=0, gen=1)
    objective = get_objective(objective_name)
    runner = None
    if hooks:
        import inspect

        from ban_analysis.instrument.hooks import HookRunner

        kwargs = {"defer": True} if "defer" in inspect.signature(HookRunner).parameters else {}
        runner = HookRunner(hooks, seed=0, train_size=len(bundle.train.index), train_index=bundle.train.index,
                            fuse_backward=True, **kwargs)
    start = time.perf_counter()
    result = train_generation(model, objective, bundle, cfg, gen=1, seed=0, hooks=runner,
                              teacher=teacher if objective.needs_teacher else None, augment=augment,
                              progress=False)
    total = time.perf_counter() - start
    evaluation = sum(result.eval_seconds) + result.final_eval_seconds
    return total - evaluation, evaluation


EVAL_SIZES = (64, 128, 256, 512, 1024)


def eval_throughput(bundle, arch, params, images: int, reps: int) -> dict[int, float]:
    """Median img/s of ``predict`` over the first ``images`` validation images, per eval batch size;
    the sizes run in a rotating order in each repetition (load drifts over all of them)."""
    from ban_analysis.engine.loop import predict

    split = dataclasses.replace(bundle.val, x=bundle.val.x[:images], y=bundle.val.y[:images],
                                index=bundle.val.index[:images])
    model = build_model(arch, params, bundle, seed=0, gen=1)
    predict(model, split, bundle, 256)  # warm-up
    rates = {size: [] for size in EVAL_SIZES}
    for rep in range(reps):
        k = rep % len(EVAL_SIZES)
        for size in EVAL_SIZES[k:] + EVAL_SIZES[:k]:
            start = time.perf_counter()
            predict(model, split, bundle, size)
            rates[size].append(len(split.y) / (time.perf_counter() - start))
    return {size: statistics.median(r) for size, r in rates.items()}


class _PILDataset(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR100.__getitem__`` does: a PIL image from NHWC uint8, then transform."""

    def __init__(self, x_nhwc, y, transform):
        self.x, self.y, self.transform = x_nhwc, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def plain_generation(bundle, epochs: int, batch_size: int, eval_batch_size: int) -> tuple[float, float]:
    """(training, evaluation) seconds of the same generation in a plain PyTorch loop.

    ResNet-20 with the same initial weights and SGD (lr 0.05, momentum 0.9, Nesterov, weight decay
    5e-4), label cross-entropy; data through ``torch.utils.data.DataLoader`` (num_workers 0) over a
    torchvision-style Dataset: ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
    ``Normalize`` for training, ``ToTensor`` + ``Normalize`` for evaluation. The same evaluations
    as ``train_generation``: the validation split every epoch, the test split at every epoch that
    improves on the best validation accuracy, which serves as the final test prediction.
    """
    import torch.nn.functional as F
    import torchvision.transforms as T

    def nhwc(split):
        return split.x.permute(0, 2, 3, 1).contiguous().numpy(), split.y.numpy()

    mean, std = bundle.mean, bundle.std
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    train = torch.utils.data.DataLoader(_PILDataset(*nhwc(bundle.train), train_tf), batch_size=batch_size,
                                        shuffle=True, generator=torch.Generator().manual_seed(0))
    loaders = {split: torch.utils.data.DataLoader(_PILDataset(*nhwc(getattr(bundle, split)), eval_tf),
                                                  batch_size=eval_batch_size, shuffle=False)
               for split in ("val", "test")}
    model = build_model("resnet20", {}, bundle, seed=0, gen=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def evaluate(split):
        model.eval()
        with torch.inference_mode():
            logits = torch.cat([model(x) for x, _ in loaders[split]])
        model.train()
        return logits

    train_s = eval_s = 0.0
    best = -1.0
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - start
        start = time.perf_counter()
        acc = (evaluate("val").argmax(1) == bundle.val.y).float().mean().item()
        if acc > best:
            best = acc
            evaluate("test")
        eval_s += time.perf_counter() - start
    return train_s, eval_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", default=None, help="substring of a setting name")
    parser.add_argument("--sections", default="paired,train,eval,generation",
                        help="comma-separated: paired (hook overhead, interleaved steps), train (CE / BAN / "
                             "hooks epochs, training and evaluation seconds), eval (predict() img/s by eval "
                             "batch size), generation (a CIFAR-100 ResNet-20 generation vs a plain PyTorch loop)")
    parser.add_argument("--rounds", type=int, default=16,
                        help="paired: rounds of one epoch (430 steps) per arm (16: the median's CI is the 4th to "
                             "the 13th block, 97.9%%; 8, the default before 2026-12-02, gives min to max)")
    parser.add_argument("--eval-batch-size", type=int, default=0, help="train: train.eval_batch_size (0 = auto)")
    parser.add_argument("--eval-reps", type=int, default=5, help="eval: repetitions per batch size")
    parser.add_argument("--gen-epochs", type=int, default=1, help="generation: epochs")
    parser.add_argument("--gen-reps", type=int, default=1, help="generation: repetitions of each loop")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}")
    print()
    if "paired" in sections:
        bundle = load_dataset("fashion_mnist", val_size=5000)
        times = paired_hooks(bundle, "mlp", {"widths": [256, 256]}, args.rounds)
        plain = times["plain"]
        print(f"Study hook set on the quick experiment's MLP (784-256-256-10, Fashion-MNIST, batch 128, BAN, "
              f"fused backward): {args.rounds} rounds of one epoch (430 steps) per arm, the arms taking turns "
              f"in {PAIRED_SLICE}-step slices on one shared model; 'plain (again)' is the noise floor")
        print()
        print("| arm | wall ms/step | CPU ms/step | wall: median block ratio | wall: total ratio | "
              "CPU: median block ratio | overhead (wall) | overhead (CPU) | wall overhead: 95% CI of the median |")
        print("|---|---|---|---|---|---|---|---|---|")
        for arm, t in times.items():
            wall = [a[0] / b[0] for a, b in zip(t, plain)]
            cpu = [a[1] / b[1] for a, b in zip(t, plain)]
            low, high = median_ci(wall)
            print(f"| {arm} | {1e3 * statistics.median(x[0] for x in t) / PAIRED_BLOCK:.2f} | "
                  f"{1e3 * statistics.median(x[1] for x in t) / PAIRED_BLOCK:.2f} | {statistics.median(wall):.3f} | "
                  f"{sum(x[0] for x in t) / sum(x[0] for x in plain):.3f} | {statistics.median(cpu):.3f} | "
                  f"{100 * (statistics.median(wall) - 1):+.1f}% | {100 * (statistics.median(cpu) - 1):+.1f}% | "
                  f"{100 * (low - 1):+.1f}% to {100 * (high - 1):+.1f}% |")
        print()
    if "train" in sections:
        print("Whole epochs of train_generation with a 5,000-image validation split (evaluated every epoch, "
              f"eval batch {args.eval_batch_size or 'auto'}); img/s over training time only")
        print()
        print("| setting | images/epoch | CE img/s | BAN img/s | BAN / CE time | BAN + study hooks img/s | "
              "hooks overhead | BAN train s/epoch | BAN eval s/epoch |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (dataset, subset, arch, params, augment) in SETTINGS.items():
            if args.only and args.only not in name:
                continue
            bundle = load_dataset(dataset, val_size=5000, train_subset=subset)
            teacher = freeze(build_model(arch, params, bundle, seed=0, gen=0))
            n = len(bundle.train.y) * args.epochs
            ebs = args.eval_batch_size
            time_generation(bundle, arch, params, "ce", None, 1, augment, eval_batch_size=ebs)  # warm-up
            ce, _ = time_generation(bundle, arch, params, "ce", None, args.epochs, augment, eval_batch_size=ebs)
            ban, ban_eval = time_generation(bundle, arch, params, "ban", teacher, args.epochs, augment,
                                            eval_batch_size=ebs)
            hooked, _ = time_generation(bundle, arch, params, "ban", teacher, args.epochs, augment, STUDY_HOOKS,
                                        eval_batch_size=ebs)
            print(f"| {name} | {len(bundle.train.y)} | {n / ce:,.0f} | {n / ban:,.0f} | {ban / ce:.2f} | "
                  f"{n / hooked:,.0f} | {100 * (hooked / ban - 1):+.0f}% | {ban / args.epochs:.1f} | "
                  f"{ban_eval / args.epochs:.1f} |")
        print()
    if sections & {"eval", "generation"}:
        from ban_analysis.engine.loop import eval_batch_size  # (the paired section also runs on older code)
    if "eval" in sections:
        print(f"predict() img/s by eval batch size (median of {args.eval_reps}, sizes interleaved), "
              f"{args.threads} threads")
        print()
        print("| model | images | " + " | ".join(f"batch {b}" for b in EVAL_SIZES) + " | auto (CPU, batch 128) |")
        print("|---|---|" + "---|" * (len(EVAL_SIZES) + 1))
        for dataset, arch, params, images in (("fashion_mnist", "mlp", {"widths": [256, 256]}, 10240),
                                              ("cifar100", "resnet20", {}, 2048)):
            bundle = load_dataset(dataset, val_size=max(5000, images))
            rates = eval_throughput(bundle, arch, params, images, args.eval_reps)
            auto = eval_batch_size(TrainConfig(), "cpu")
            print(f"| {arch} | {images} | " + " | ".join(f"{rates[b]:,.0f}" for b in EVAL_SIZES) + f" | {auto} |")
        print()
    if "generation" in sections:
        bundle = load_dataset("cifar100", val_size=5000, train_subset=2560)
        auto = eval_batch_size(TrainConfig(), "cpu")
        arms = {f"train_generation, eval batch auto ({auto})": lambda: time_generation(
                    bundle, "resnet20", {}, "ce", None, args.gen_epochs, "crop_flip", eval_batch_size=0),
                "train_generation, eval batch 1024 (the old default)": lambda: time_generation(
                    bundle, "resnet20", {}, "ce", None, args.gen_epochs, "crop_flip", eval_batch_size=1024),
                f"plain PyTorch + DataLoader, eval batch {auto}": lambda: plain_generation(
                    bundle, args.gen_epochs, 128, auto)}
        times = {arm: [] for arm in arms}
        for rep in range(args.gen_reps):
            names = list(arms)
            for arm in names[rep % len(names):] + names[:rep % len(names)]:
                times[arm].append(arms[arm]())
        print(f"One CIFAR-100 ResNet-20 generation (objective ce): {len(bundle.train.y)} training images x "
              f"{args.gen_epochs} epoch(s), batch 128, crop+flip; validation ({len(bundle.val.y)}) every epoch, "
              f"test ({len(bundle.test.y)}) at the best epoch; median of {args.gen_reps}, arms interleaved")
        print()
        print("| loop | train s | eval s | total s | total / plain |")
        print("|---|---|---|---|---|")
        plain = statistics.median(sum(t) for t in times[list(arms)[-1]])
        for arm, t in times.items():
            tr, ev = statistics.median(x[0] for x in t), statistics.median(x[1] for x in t)
            total = statistics.median(sum(x) for x in t)
            print(f"| {arm} | {tr:.1f} | {ev:.1f} | {total:.1f} | {total / plain:.2f} |")
        print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
