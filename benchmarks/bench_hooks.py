"""Cost of the instrumentation hooks relative to a plain BAN training step.

Run by hand:  python benchmarks/bench_hooks.py [--threads 1] [--models mlp,resnet20] [--quick]
              [--only heldout_attribution]   (only the hook-table rows whose label starts so)

Per model (the quick experiment's 784-256-256-10 MLP and a CIFAR ResNet-20, batch 128, BAN
objective against fixed random teacher logits, SGD with momentum and weight decay):

* base step: forward, objective, zero_grad, backward, SGD step. One "backward pass" is the
  median time of ``out.loss.backward()`` inside the base step.
* each hook alone, due every step: overhead % of the step (hook time and step-time difference).
* update_share per call and param_split per call (32 rows of the batch) in backward passes.
* param_split (contribution / exact / vmap) against a per-sample Python loop at B' = 32: the
  loop takes 2 VJPs per sample through the batch graph (exact, BN included); for the MLP also a
  loop of single-sample forwards + 2 VJPs.
* the default study hook set run for ``--steps`` steps against the same steps without hooks.
* heldout_attribution (512 held-out rows of random inputs, eval mode): ms per due step, alone,
  fused, and fused with update_share (sharing its G_target).
* Parquet bytes per epoch for Fashion-MNIST (55k samples) from synthetic logit_split rows.

Hook costs are medians of ratios taken in pairs (a plain step, then a hooked one), so load from
other processes on a shared machine falls on both sides of each ratio alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import platform
import statistics
import subprocess
import time

import torch

from ban_analysis.instrument import param_grads as pg
from ban_analysis.instrument.hooks import HookRunner, StepContext
from ban_analysis.losses import get_objective
from ban_analysis.models import create_model

B, ROWS = 128, 32
MODELS = {"mlp": ("mlp", (1, 28, 28), {"widths": [256, 256]}), "resnet20": ("resnet20", (3, 32, 32), {})}


def setup(name: str, seed: int = 0):
    arch, shape, params = MODELS[name]
    model = create_model(arch, 10, shape, seed=seed, **params).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *shape, generator=g)
    target = torch.randint(0, 10, (B,), generator=g)
    teacher_logits = 3 * torch.randn(B, 10, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    return model, opt, x, target, teacher_logits


def heldout_data(name: str, n: int = 512, seed: int = 1):
    """(x, y) for heldout_attribution: n normalised random inputs of the model's shape."""
    _, shape, _ = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def step(model, opt, x, target, teacher_logits, runner=None, i=0) -> dict[str, float]:
    """One training step; returns segment times (forward+objective, hooks, backward, total)."""
    obj = get_objective("ban")
    t0 = time.perf_counter()
    cap = runner.capture(model, i) if runner is not None else contextlib.nullcontext()
    with cap:
        student_logits = model(x)
    out = obj(student_logits, teacher_logits, target)
    t1 = time.perf_counter()
    if runner is not None:
        runner.run(StepContext(gen=1, epoch=0, step=i, sample_index=torch.arange(B), inputs=x, target=target,
                               student_logits=student_logits, teacher_logits=teacher_logits, out=out,
                               model=model, captured=cap.captured, lr=opt.param_groups[0]["lr"]))
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    t3 = time.perf_counter()
    if runner is not None and runner.fuse_backward:
        runner.after_backward()
    t4 = time.perf_counter()
    opt.step()
    t5 = time.perf_counter()
    if runner is not None:
        runner.after_step()  # heldout_attribution: the held-out loss after the step
    t6 = time.perf_counter()
    return {"fwd": t1 - t0, "hooks": t2 - t1 + t4 - t3 + t6 - t5, "bwd": t3 - t2, "total": t6 - t0}


def compare(model, opt, batch, cfg, reps, warmup=2, fuse=False, heldout=None):
    """Base and hooked steps in pairs (hooks due every step); medians of the paired ratios.

    Returns the base step's median segments and, per pair, hook time / base step, hook time /
    base backward, and the extra forward time (activation capture) / base step.
    """
    runner = HookRunner(cfg, seed=0, train_size=B, fuse_backward=fuse, heldout=heldout) if cfg else None
    base, ratios = [], {"step": [], "bwd": [], "fwd": [], "ms": []}
    for r in range(warmup + reps):
        a = step(model, opt, *batch)
        if runner is not None:
            h = step(model, opt, *batch, runner=runner, i=0)
        if r < warmup:
            continue
        base.append(a)
        if runner is not None:
            ratios["step"].append(h["hooks"] / a["total"])
            ratios["bwd"].append(h["hooks"] / a["bwd"])
            ratios["fwd"].append((h["fwd"] - a["fwd"]) / a["total"])
            ratios["ms"].append(1e3 * h["hooks"])
    med = {k: statistics.median(x[k] for x in base) for k in base[0]}
    return med, {k: statistics.median(v) if v else 0.0 for k, v in ratios.items()}


def loop_reference(model, student_logits, cot, rows):
    """Per-sample loop: 2 VJPs per sample through the batch graph, then the five columns."""
    params = [p for p in model.parameters()]
    batch_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        student_logits, params, grad_outputs=cot["target"] + cot["dark"], retain_graph=True)])
    out = []
    for s in rows.tolist():
        flat = []
        for term in pg.TERMS:
            c = torch.zeros_like(cot[term])
            c[s] = cot[term][s]
            g = torch.autograd.grad(student_logits, params, grad_outputs=c, retain_graph=True)
            flat.append(torch.cat([t.reshape(-1) for t in g]))
        out.append(torch.stack([flat[0].norm(), flat[1].norm(), flat[0] @ flat[1], flat[0] @ batch_grad]))
    return torch.stack(out)


def loop_forward(model, x, cot, rows):
    """Per-sample loop with a single-sample forward each (valid without BN / dropout)."""
    params = list(model.parameters())
    for s in rows.tolist():
        z = model(x[s:s + 1])[0]
        for term in pg.TERMS:
            torch.autograd.grad(z, params, grad_outputs=cot[term][s], retain_graph=True)


def timed(fn, reps):
    """Minimum seconds over ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def per_sample_modes(name, reps):
    """param_split modes and the loops at B' = 32 (seconds per call)."""
    model, _, x, target, teacher_logits = setup(name)
    with pg.capture_activations(model, pg.covered_modules(model)) as captured:
        student_logits = model(x)
    out = get_objective("ban")(student_logits, teacher_logits, target)
    g = out.logit_grad * B
    t = torch.zeros_like(g)
    t[torch.arange(B), target] = g[torch.arange(B), target]
    cot = {"target": t, "dark": g - t}
    rows = torch.arange(0, B, B // ROWS)
    params = dict(model.named_parameters())
    bg = dict(zip(params, torch.autograd.grad(student_logits, list(params.values()), retain_graph=True,
                                              grad_outputs=t + (g - t))))
    res = {
        # The unit, measured here so load changes between sections do not skew the ratios.
        "one backward pass (unit)": timed(lambda: torch.autograd.grad(out.loss, list(params.values()),
                                                                      retain_graph=True), reps),
        "contribution": timed(lambda: pg.contribution_stats(student_logits, model, captured, cot, rows), reps),
        "exact, batched VJPs": timed(lambda: pg.exact_stats(student_logits, params, cot, rows, chunk_size=16),
                                     max(1, reps // 3)),
        "vmap (eval_mode: BN on running stats)": timed(
            lambda: pg.vmap_stats(model, x, cot, bg, rows, eval_mode=True), max(1, reps // 3)),
        # = exact with exact_vjp "loop" (what "auto" picks on CPU), minus the chunking
        "loop (batch-graph VJPs)": timed(lambda: loop_reference(model, student_logits, cot, rows), 1),
        # Exact only without BN (the MLP); for ResNet-20 a cost reference (one sample's BN
        # statistics are not the batch's), run on a copy so the benchmark model is untouched.
        "loop (1-sample forwards)": timed(lambda: loop_forward(copy.deepcopy(model), x, cot, rows),
                                          max(1, reps // 3)),
    }
    return res


def default_set_amortised(name, steps, every_update_share, reps, fuse=False):
    """The study hook set over ``steps`` steps vs the same steps without hooks (seconds).

    Two copies of the model train side by side, one step each in turn; the whole sequence is
    repeated ``reps`` times and each step index keeps its minimum time.
    """
    cfg = {"logit_split": {}, "head_split": {}, "update_share": {"every_n_steps": every_update_share},
           "param_split": {"every_n_steps": 50, "samples": ROWS}}
    best = {"base": [float("inf")] * steps, "hooked": [float("inf")] * steps}
    for _ in range(reps):
        runs = {"base": (*setup(name), None),
                "hooked": (*setup(name), HookRunner(cfg, seed=0, train_size=B, fuse_backward=fuse))}
        for i in range(-3, steps):  # 3 warm-up steps (i < 0) are not counted
            for label, (model, opt, x, target, teacher_logits, runner) in runs.items():
                t = step(model, opt, x, target, teacher_logits, runner=runner if i >= 0 else None, i=max(i, 0))
                if i >= 0:
                    best[label][i] = min(best[label][i], t["total"])
    totals = {k: sum(v) for k, v in best.items()}
    return totals["hooked"] / totals["base"] - 1, totals


def parquet_size(n_samples=55_000, batch=128):
    """Bytes of one epoch of logit_split (and head_split) rows, written as the run writer does."""
    import numpy as np
    import pandas as pd

    from ban_analysis.instrument.decompose import per_sample_stats

    g = torch.Generator().manual_seed(0)
    blocks = {"logit_split": [], "head_split": []}
    obj = get_objective("ban")
    for i, start in enumerate(range(0, n_samples, batch)):
        n = min(batch, n_samples - start)
        target = torch.randint(0, 10, (n,), generator=g)
        # A teacher that is right ~90% of the time with realistic confidence spread.
        teacher_logits = torch.randn(n, 10, generator=g) + 6 * torch.nn.functional.one_hot(target, 10)
        student_logits = teacher_logits + torch.randn(n, 10, generator=g)
        out = obj(student_logits, teacher_logits, target)
        cols = per_sample_stats(student_logits, teacher_logits, target, out)
        meta = {"gen": np.full(n, 1, np.int32), "epoch": np.full(n, 0, np.int32), "step": np.full(n, i, np.int64),
                "sample_index": torch.randperm(n_samples, generator=g)[:n].numpy(), "target": target.numpy()}
        blocks["logit_split"].append({**meta, **{k: v.numpy() for k, v in cols.items()}})
        head = pg.head_stats(torch.rand(n, 256, generator=g), {"target": out.logit_grad * n, "dark": out.logit_grad * n})
        blocks["head_split"].append({**meta, **{k: v.numpy() for k, v in head.items()}})
    sizes = {}
    for hook, bl in blocks.items():
        frame = pd.concat([pd.DataFrame(b) for b in bl], ignore_index=True)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False, compression="zstd")
        sizes[hook] = (buf.tell(), len(frame), len(frame.columns))
    return sizes


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="mlp,resnet20")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (rough numbers)")
    ap.add_argument("--steps", type=int, default=100, help="steps for the measured default-set run")
    ap.add_argument("--update-share-every", type=int, default=25)
    ap.add_argument("--only", default="", help="comma-separated label prefixes: run only those hook-table "
                                               "rows (e.g. heldout_attribution) and skip the other sections")
    args = ap.parse_args()
    only = tuple(p for p in args.only.split(",") if p)
    torch.set_num_threads(args.threads)
    q = 4 if args.quick else 1
    print(f"# machine: {machine()}; torch {torch.__version__}; threads {args.threads}; "
          f"date {time.strftime('%Y-%m-%d %H:%M')}; batch {B}; param_split rows {ROWS}")
    for name in args.models.split(","):
        reps = {"mlp": 100, "resnet20": 8}[name] // q
        model, opt, *batch = setup(name)
        base, _ = compare(model, opt, batch, None, reps)
        print(f"\n## {name}: base step {base['total'] * 1e3:.1f} ms (forward+objective "
              f"{base['fwd'] * 1e3:.1f} ms, backward {base['bwd'] * 1e3:.1f} ms = 1 backward pass; medians)")
        print("| hook, due every step | hook call, % of step | + capture in forward, % of step "
              "| per call, backward passes |")
        print("|---|---|---|---|")
        ps = {"param_split": {"every_n_steps": 1, "samples": ROWS}}
        cfgs = {"logit_split": ({"logit_split": {}}, False), "head_split": ({"head_split": {}}, False),
                "update_share": ({"update_share": {}}, False),
                "update_share batched=true": ({"update_share": {"batched": True}}, False),
                "update_share fused": ({"update_share": {}}, True),
                "param_split contribution, 32 rows": (ps, False),
                "param_split contribution fused": (ps, True)}
        ho = {"heldout_attribution": {"every_n_steps": 1}}
        cfgs.update({"heldout_attribution, 512 rows": (ho, False), "heldout_attribution fused": (ho, True),
                     "heldout_attribution + update_share, fused (both)": ({"update_share": {}, **ho}, True)})
        if only:
            cfgs = {k: v for k, v in cfgs.items() if k.startswith(only)}
        cost, ms = {}, {}  # per call: fraction of a base step (hook call + capture), and ms
        for label, (cfg, fuse) in cfgs.items():
            held = heldout_data(name) if "heldout_attribution" in cfg else None
            _, r = compare(model, opt, batch, cfg, max(2, reps // 4) if held is not None else reps,
                           fuse=fuse, heldout=held)
            fwd = max(r["fwd"], 0.0) if label.startswith(("param_split", "head_split")) else 0.0
            cost[label], ms[label] = r["step"] + fwd, r["ms"]
            print(f"| {label} | {100 * r['step']:.1f} | {100 * fwd:.1f} | {r['bwd']:.2f} |")
        for label in (k for k in ms if k.startswith("heldout_attribution")):
            print(f"- {label}: {ms[label]:.1f} ms per due step (median); amortised at every_n_steps = 25: "
                  f"{100 * cost[label] / 25:+.1f}% of the training time")
        if only:
            continue
        modes = per_sample_modes(name, max(2, reps // 8))
        bwd = modes.pop("one backward pass (unit)")
        print(f"\nOne backward pass here: {bwd:.4f} s (autograd.grad of the loss, graph retained).")
        print("\n| param_split at B'=32 | seconds per call | backward passes | speed-up vs batch-graph loop "
              "| vs 1-sample loop |")
        print("|---|---|---|---|---|")
        for k, v in modes.items():
            print(f"| {k} | {v:.4f} | {v / bwd:.1f} | {modes['loop (batch-graph VJPs)'] / v:.1f}x "
                  f"| {modes['loop (1-sample forwards)'] / v:.1f}x |")
        print("\nDefault study set (logit_split + head_split every step, param_split every 50 on 32 rows,"
              " update_share every N), amortised, from the per-call costs above:")
        always = cost["logit_split"] + cost["head_split"]
        for every in (1, 5, 10, 20, 25, 50):
            est = [always + cost[f"update_share{f}"] / every + cost[f"param_split contribution{g}"] / 50
                   for f, g in (("", ", 32 rows"), (" fused", " fused"))]
            print(f"- N = {every}: {100 * est[0]:+.1f}% (fused: {100 * est[1]:+.1f}%)")
        n_steps = args.steps // q // (2 if name == "resnet20" else 1)
        for fuse in (False, True):
            amort, totals = default_set_amortised(name, n_steps, args.update_share_every,
                                                  3 if name == "mlp" else 1, fuse=fuse)
            print(f"\nMeasured{' (fused)' if fuse else ''}: the set with N = {args.update_share_every} over "
                  f"{n_steps} steps, side by side with plain steps: {100 * amort:+.1f}% "
                  f"(hooked {totals['hooked']:.2f} s, base {totals['base']:.2f} s)")
    if only:
        return
    print("\n## Parquet per epoch, Fashion-MNIST (55,000 samples, zstd)")
    for hook, (size, rows, cols) in parquet_size().items():
        print(f"- {hook}: {size / 2**20:.2f} MiB for {rows} rows x {cols} columns ({size / rows:.1f} B/row)")


if __name__ == "__main__":
    main()
