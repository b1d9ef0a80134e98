"""Data path benchmark: in-memory uint8 batches vs a torchvision Dataset + transforms + DataLoader.

What it measures, on CIFAR-100 (from $BAN_DATA, else ../shared/data, else --root):

1. images/s over ``--images`` training images (default 20,000, ~0.4 epoch) of
   a. ``ban_analysis.data.iterate_batches`` (crop with pad 4 + flip + normalise, batch 128), and
   b. the usual torchvision pipeline: a Dataset returning ``Image.fromarray(img)`` through
      ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize``,
      batched by a ``DataLoader`` (batch 128, shuffle) with num_workers 0 and 2;
2. the time of one ResNet-20 training step (forward, cross-entropy, backward, SGD step) at
   batch 128, and the in-memory path's share of (data + step) time.

Goal: in-memory >= 5x the best DataLoader and < 5% of the step time.

Run: ``python benchmarks/bench_data.py [--images 20000] [--steps 10] [--threads 1,2]``.
Each measurement is repeated per torch thread count (DataLoader workers are one thread each
either way). Timings on a shared machine include other processes' load; the script prints
the load average so a reader can judge.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def find_root(arg: str | None) -> Path:
    for candidate in (arg, os.environ.get("BAN_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                      "/work/shared/data"):
        if candidate and (Path(candidate) / "cifar100.npz").is_file():
            return Path(candidate)
    raise SystemExit("cifar100.npz not found: pass --root or set BAN_DATA")


class NumpyCIFAR(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100.__getitem__ does: PIL image from NHWC uint8, then transform."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def time_dataloader(x_nhwc, y, mean, std, workers: int, images: int, batch: int) -> float:
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(
        NumpyCIFAR(x_nhwc, y, transform), batch_size=batch, shuffle=True, num_workers=workers,
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
    )
    seen = 0
    start = time.perf_counter()  # includes worker start-up, as a real epoch does
    for xb, _ in loader:
        seen += xb.shape[0]
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def time_in_memory(split, mean, std, images: int, batch: int) -> tuple[float, float]:
    from ban_analysis.data import iterate_batches

    g = torch.Generator().manual_seed(0)
    seen, batches = 0, 0
    start = time.perf_counter()
    while seen < images:
        for xb, _, _ in iterate_batches(split, batch, generator=g, augment="crop_flip", pad=4, mean=mean, std=std):
            seen += xb.shape[0]
            batches += 1
            if seen >= images:
                break
    elapsed = time.perf_counter() - start
    return seen / elapsed, elapsed / batches


def time_resnet20_step(split, mean, std, steps: int, batch: int) -> float:
    from ban_analysis.data import iterate_batches
    from ban_analysis.models import create_model

    model = create_model("resnet20", 100, (3, 32, 32), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    xb, yb, _ = next(iter(iterate_batches(split, batch, generator=g, mean=mean, std=std)))
    times = []
    for k in range(steps + 2):  # 2 warm-up steps
        start = time.perf_counter()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= 2:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to run")
    args = parser.parse_args()

    from ban_analysis.data import load_dataset

    root = find_root(args.root)
    bundle = load_dataset("cifar100", root=root, val_size=5000, val_seed=0)
    x_nhwc = bundle.train.x.permute(0, 2, 3, 1).contiguous().numpy()  # same training images, PIL layout
    y = bundle.train.y.numpy()
    print(f"date: {datetime.date.today().isoformat()}; cpu: {cpu_model()}; cores: {os.cpu_count()}; "
          f"torch {torch.__version__}; load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"CIFAR-100 train split ({len(bundle.train)} images), {args.images} images per path, batch {args.batch}\n")
    print("| torch threads | data path | images/s | in-memory speed-up |")
    print("|---:|---|---:|---:|")
    summary = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        mem_rate, mem_batch_s = time_in_memory(bundle.train, bundle.mean, bundle.std, args.images, args.batch)
        print(f"| {threads} | in-memory uint8 (iterate_batches: crop+flip+normalise) | {mem_rate:,.0f} | |", flush=True)
        for workers in (0, 2):
            rate = time_dataloader(x_nhwc, y, bundle.mean, bundle.std, workers, args.images, args.batch)
            print(f"| {threads} | torchvision Dataset + transforms + DataLoader, num_workers={workers} | {rate:,.0f} "
                  f"| {mem_rate / rate:.1f}x |", flush=True)
        step_s = time_resnet20_step(bundle.train, bundle.mean, bundle.std, args.steps, args.batch)
        share = mem_batch_s / (mem_batch_s + step_s)
        summary.append(f"{threads} thread(s): ResNet-20 training step, batch {args.batch} (median of {args.steps}): "
                       f"{step_s * 1e3:.0f} ms; in-memory data per batch {mem_batch_s * 1e3:.2f} ms = {share:.2%} "
                       f"of data + step (goal < 5%)")
    print()
    for line in summary:
        print(line)
    print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
