"""GPU throughput of the paper's CIFAR-100 settings, and what the paper's tables would cost.

One script, under 8 minutes on one current GPU, synthetic data (random uint8 images on the
device, the engine's own in-memory crop+flip and normalisation), every step the engine's
``train_step`` (forward, objective, backward, scaler when fp16, SGD + Nesterov, weight decay):

1. ResNet-18 (``resnet18_cifar``, 32x32, 100 classes, batch 128): training img/s with bf16
   autocast and channels_last, eager and under ``torch.compile`` (compile time reported);
2. the BAN / CE step-time ratio with a same-size teacher (crop+flip: the teacher's eval-mode
   forward runs in every step);
3. the studies' hook set's overhead on the BAN step: logit_split + head_split every step,
   update_share every 25 steps, fused backward;
4. seconds per epoch of the paper's DenseNet-BC presets (112-33, 90-60, 80-80, 80-120) and of
   WRN-28-{1,2,5,10} on CIFAR-100: ``--steps`` steps measured, extrapolated to the train split
   of ``experiments/cifar100_*.toml`` (50,000 - val_size images, batch_size) plus the epoch's
   validation pass (val_size images), for a teacher epoch (CE) and a student epoch (BAN, with
   the teacher's forward in every step);
5. the projected GPU hours of the paper's CIFAR-100 tables, from those epochs and the configs'
   epochs, generations and objectives (below);
6. peak memory of each measurement (``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_gpu.py                       # --device cuda
    python benchmarks/bench_gpu.py --device cpu --quick  # tiny sizes, a few steps: seconds, a smoke test

``--quick`` keeps every row but uses 8x8 images, batch 2, 1 step, the epoch rows' networks at
their depths but DenseNet growth 4 and WRN width 1, and ``torch.compile(backend="eager")`` on
CPU (no C++ compiler run): its numbers mean nothing, it checks that the script runs
(``tests/test_bench_gpu.py``).

The tables projected (``experiments/cifar100_densenet.toml`` and ``cifar100_wrn.toml`` say how
the other cells are run): DenseNet table (``cifar100_densenet.toml``): for each preset, one
teacher and ``ban.generations`` students for each of the objectives ban, cwtm, dkpp (the
config's "CWTM / DKPP columns"), teachers shared across objectives as in a study. WRN table
(``cifar100_wrn.toml``): for each width 1, 2, 5, 10 a teacher, ``ban.generations`` BAN
students, and the "WRN -> DenseNet-90-60" column's DenseNet-90-60 student. One seed; a
10-seed study is 10x.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from ban_analysis.data.batches import Split, iterate_batches
from ban_analysis.engine.amp import make_scaler
from ban_analysis.engine.step import teacher_forward, train_step
from ban_analysis.losses import get_objective
from ban_analysis.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CIFAR100_TRAIN = 50_000
DENSENET_PRESETS = ("112-33", "90-60", "80-80", "80-120")
WRN_WIDTHS = (1, 2, 5, 10)
DENSENET_OBJECTIVES = ("ban", "cwtm", "dkpp")
HOOKS = {"logit_split": {}, "head_split": {}, "update_share": {"every_n_steps": 25}}
MEAN, STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)

# every row the script prints, in order (tests/test_bench_gpu.py checks them all)
ROWS = ["resnet18_cifar train img/s, bf16 + channels_last, eager",
        "resnet18_cifar train img/s, bf16 + channels_last, torch.compile",
        "BAN / CE step time, resnet18_cifar, same-size teacher, crop+flip",
        "study hooks overhead on the BAN step (logit_split + head_split, update_share / 25, fused)"]
ROWS += [f"densenet_bc {p} s/epoch (CE teacher / BAN student)" for p in DENSENET_PRESETS]
ROWS += [f"wrn 28-{w} s/epoch (CE teacher / BAN student)" for w in WRN_WIDTHS]
ROWS += ["projected hours, DenseNet-BC table (cifar100_densenet.toml)",
         "projected hours, WRN table (cifar100_wrn.toml)",
         "projected hours, both tables"]


@dataclass
class Sizes:
    side: int
    batch: int
    steps: int     # measured steps per row
    warmup: int
    n_images: int  # synthetic images held on the device


def quick_params(arch: str, params: dict) -> dict:
    """--quick: the same depths (so the same layer layouts), DenseNet growth 4 and WRN width 1."""
    if arch == "densenet_bc":
        from ban_analysis.models.densenet_bc import PRESETS

        return {"depth": PRESETS[params["preset"]][0], "growth": 4}
    if arch == "wrn":
        return {**params, "width": 1}
    return params


def read_config(name: str) -> dict:
    return tomllib.loads((ROOT / "experiments" / name).read_text())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


PEAKS: list[float] = []  # GiB of every measurement, for the run's overall peak


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    PEAKS.append(torch.cuda.max_memory_allocated(device) / 2**30)
    return f"{PEAKS[-1]:.2f}"


def synthetic_split(sizes: Sizes, device: torch.device, classes: int = 100) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (sizes.n_images, 3, sizes.side, sizes.side), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (sizes.n_images,), generator=g)
    return Split(x=x.to(device), y=y.to(device), index=torch.arange(sizes.n_images, device=device))


def batches(split: Split, batch: int, device: torch.device, channels_last: bool):
    """Endless crop+flip batches of ``split`` (the engine's data path), channels_last if asked."""
    g = torch.Generator(device=device).manual_seed(0)
    while True:
        for x, y, index in iterate_batches(split, batch, shuffle=True, generator=g, augment="crop_flip", pad=4,
                                           mean=MEAN, std=STD, drop_last=True):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y, index


def make_model(arch: str, params: dict, sizes: Sizes, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=100, input_shape=(3, sizes.side, sizes.side), **params).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def time_steps(model, objective, data, optimizer, steps: int, warmup: int, device, *, amp: str,
               teacher=None, hooks=None, forward=None) -> tuple[float, float]:
    """(seconds per step over ``steps`` steps after ``warmup``, seconds of the warm-up)."""
    scaler = make_scaler(amp, device)
    model.train()
    step = 0

    def run(n: int) -> float:  # seconds of n steps, the device synchronised at the end
        nonlocal step
        started = time.perf_counter()
        for _ in range(n):
            x, y, index = next(data)
            train_step(model, objective, x, y, optimizer, teacher=teacher, hooks=hooks, step=step,
                       sample_index=index, amp=amp, scaler=scaler, forward=forward)
            step += 1
        sync(device)
        return time.perf_counter() - started

    warm = run(warmup)
    return run(steps) / steps, warm


def time_teacher(teacher, data, steps: int, device, amp: str) -> float:
    """Seconds per eval-mode teacher forward (inference mode) of one batch."""
    for _ in range(2 if steps > 1 else 1):  # warm-up
        teacher_forward(teacher, next(data)[0], amp)
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        teacher_forward(teacher, next(data)[0], amp)
    sync(device)
    return (time.perf_counter() - started) / steps


def frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Table:
    def __init__(self):
        self.printed = []
        print("| row | value | unit | peak memory GiB | detail |")
        print("|---|---:|---|---:|---|")

    def row(self, name: str, value: str, unit: str, peak: str, detail: str = "") -> None:
        assert name in ROWS, name
        self.printed.append(name)
        print(f"| {name} | {value} | {unit} | {peak} | {detail} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (seconds on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per row (default 100, --quick 2)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: --device cuda but torch sees no CUDA device; use --device cpu --quick", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    steps = args.steps or (1 if args.quick else 100)
    sizes = Sizes(side=8, batch=2, steps=steps, warmup=1, n_images=32) if args.quick else \
        Sizes(side=32, batch=128, steps=steps, warmup=15, n_images=8192)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    dense_cfg, wrn_cfg = read_config("cifar100_densenet.toml"), read_config("cifar100_wrn.toml")
    print(f"bench_gpu: {time.strftime('%Y-%m-%d %H:%M')}; device {device} ({name}); torch {torch.__version__}; "
          f"{'--quick (numbers meaningless)' if args.quick else 'full'}; {sizes.side}x{sizes.side} images, "
          f"batch {sizes.batch}, {sizes.steps} measured steps per row, synthetic data")
    print()
    table = Table()
    total_started = time.perf_counter()
    split = synthetic_split(sizes, device)
    ce, ban = get_objective("ce"), get_objective("ban")

    # 1. ResNet-18, bf16 + channels_last, eager and compiled
    reset_peak(device)
    model = make_model("resnet18_cifar", {}, sizes, device, True)
    data = batches(split, sizes.batch, device, True)
    eager, _ = time_steps(model, ce, data, sgd(model), sizes.steps, sizes.warmup, device, amp="bf16")
    table.row(ROWS[0], f"{sizes.batch / eager:,.0f}", "img/s", peak_gib(device), f"{1000 * eager:.1f} ms/step")
    reset_peak(device)
    model = make_model("resnet18_cifar", {}, sizes, device, True)
    backend = "eager" if (args.quick and device.type == "cpu") else "inductor"
    compiled = torch.compile(model, backend=backend)
    try:
        step_s, warm = time_steps(model, ce, data, sgd(model), sizes.steps, sizes.warmup + 2, device, amp="bf16",
                                  forward=compiled)
        table.row(ROWS[1], f"{sizes.batch / step_s:,.0f}", "img/s", peak_gib(device),
                  f"{1000 * step_s:.1f} ms/step; {eager / step_s:.2f}x eager; backend {backend}, "
                  f"compile + warm-up {warm:.0f} s")
    except Exception as err:  # a compiler missing on this machine: say so, keep the other rows
        table.row(ROWS[1], "n/a", "img/s", peak_gib(device), f"torch.compile failed: {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:120] if str(err) else ''}")
    del model, compiled

    # 2. BAN / CE with a same-size teacher, per-step teacher forward (crop+flip)
    reset_peak(device)
    teacher = frozen(make_model("resnet18_cifar", {}, sizes, device, True))
    student = make_model("resnet18_cifar", {}, sizes, device, True)
    ce_s, _ = time_steps(student, ce, data, sgd(student), sizes.steps, sizes.warmup, device, amp="bf16")
    student = make_model("resnet18_cifar", {}, sizes, device, True)
    ban_s, _ = time_steps(student, ban, data, sgd(student), sizes.steps, sizes.warmup, device, amp="bf16",
                          teacher=teacher)
    table.row(ROWS[2], f"{ban_s / ce_s:.2f}", "x", peak_gib(device),
              f"CE {1000 * ce_s:.1f} ms/step, BAN {1000 * ban_s:.1f} ms/step")

    # 3. the study hook set on the BAN step, fused backward
    from ban_analysis.instrument.hooks import HookRunner

    reset_peak(device)
    hook_steps = max(sizes.steps, 25) if not args.quick else sizes.steps
    student = make_model("resnet18_cifar", {}, sizes, device, True)
    plain, _ = time_steps(student, ban, data, sgd(student), hook_steps, sizes.warmup, device, amp="bf16",
                          teacher=teacher)
    student = make_model("resnet18_cifar", {}, sizes, device, True)
    runner = HookRunner(HOOKS, seed=0, train_size=sizes.n_images, fuse_backward=True)
    hooked, _ = time_steps(student, ban, data, sgd(student), hook_steps, sizes.warmup, device, amp="bf16",
                           teacher=teacher, hooks=runner)
    table.row(ROWS[3], f"{100 * (hooked / plain - 1):+.1f}", "%", peak_gib(device),
              f"BAN {1000 * plain:.1f} ms/step, with hooks {1000 * hooked:.1f} ms/step, {hook_steps} steps")
    del teacher, student, runner

    # 4. seconds per epoch of the paper's architectures, CIFAR-100 recipe of the configs
    epochs_s = {}
    archs = [("densenet_bc", {"preset": p}, ROWS[4 + i], dense_cfg) for i, p in enumerate(DENSENET_PRESETS)]
    archs += [("wrn", {"depth": 28, "width": w, "dropout": 0.0}, ROWS[8 + i], wrn_cfg) for i, w in enumerate(WRN_WIDTHS)]
    for arch, params, row, cfg in archs:
        train_cfg, data_cfg = cfg["train"], cfg["data"]
        amp, channels_last = train_cfg.get("amp", "off"), bool(train_cfg.get("channels_last", False))
        batch = sizes.batch if args.quick else int(train_cfg.get("batch_size", 128))
        n_train = CIFAR100_TRAIN - int(data_cfg.get("val_size", 5000))
        n_val = int(data_cfg.get("val_size", 5000))
        reset_peak(device)
        model = make_model(arch, quick_params(arch, params) if args.quick else params, sizes, device, channels_last)
        arch_data = batches(split, batch, device, channels_last)
        step_s, _ = time_steps(model, ce, arch_data, sgd(model), sizes.steps, sizes.warmup, device, amp=amp)
        teacher_s = time_teacher(frozen(model), arch_data, max(1, sizes.steps // 2), device, amp)
        steps_per_epoch = math.ceil(n_train / batch)
        val_s = math.ceil(n_val / batch) * teacher_s  # the epoch's validation pass, eval-mode forwards
        ce_epoch = steps_per_epoch * step_s + val_s
        ban_epoch = steps_per_epoch * (step_s + teacher_s) + val_s
        epochs_s[(arch, params.get("preset") or params.get("width"))] = (ce_epoch, ban_epoch)
        table.row(row, f"{ce_epoch:.1f} / {ban_epoch:.1f}", "s/epoch", peak_gib(device),
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; step {1000 * step_s:.1f} ms, "
                  f"teacher forward {1000 * teacher_s:.1f} ms; {steps_per_epoch} steps of {batch} + {n_val} val "
                  f"images; amp {amp}, channels_last {channels_last}")
        del model, arch_data

    # 5. projected hours of the paper's CIFAR-100 tables
    hours_unit = "GPU h" if device.type == "cuda" else "CPU h"
    d_epochs, d_gens = int(dense_cfg["train"]["epochs"]), int(dense_cfg["ban"]["generations"])
    dense_h = sum(d_epochs * (ce_e + len(DENSENET_OBJECTIVES) * d_gens * ban_e)
                  for (arch, _), (ce_e, ban_e) in epochs_s.items() if arch == "densenet_bc") / 3600
    w_epochs, w_gens = int(wrn_cfg["train"]["epochs"]), int(wrn_cfg["ban"]["generations"])
    dn_student = epochs_s[("densenet_bc", "90-60")][1]
    wrn_h = sum(w_epochs * (ce_e + w_gens * ban_e + dn_student)
                for (arch, _), (ce_e, ban_e) in epochs_s.items() if arch == "wrn") / 3600
    table.row(ROWS[12], f"{dense_h:.1f}", hours_unit, "-",
              f"{len(DENSENET_PRESETS)} presets x (teacher + {len(DENSENET_OBJECTIVES)} objectives "
              f"{'/'.join(DENSENET_OBJECTIVES)} x {d_gens} generations) x {d_epochs} epochs, one seed")
    table.row(ROWS[13], f"{wrn_h:.1f}", hours_unit, "-",
              f"{len(WRN_WIDTHS)} widths x (teacher + {w_gens} BAN student + DenseNet-90-60 student) x "
              f"{w_epochs} epochs, one seed")
    table.row(ROWS[14], f"{dense_h + wrn_h:.1f}", hours_unit, "-",
              f"one seed; x10 for a 10-seed study: {10 * (dense_h + wrn_h):.0f} GPU h")
    missing = [r for r in ROWS if r not in table.printed]
    assert not missing, missing
    print()
    print(f"bench_gpu: done in {time.perf_counter() - total_started:.0f} s"
          + (f"; largest peak memory {max(PEAKS):.2f} GiB" if PEAKS else ""))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
