"""Probe: what one extra op in a plain MLP training step costs the whole step (seventh pass).

Usage: python benchmarks/probe_step_ops.py THREADS ROUNDS [ARM,ARM,...]  (arms: see ARMS; default all)

A stand-alone 784-256-256-10 MLP on random data (SGD with momentum, batch 128, cross-entropy),
no ban_analysis code: each arm adds one op after the loss, before the backward (where the keep
path runs), reading the head input from the logits' graph (``_saved_mat1``) or not. The arms take
turns in 43-step slices (ten slices a round, rotating order), and the table gives each arm's
median block ratio to ``plain``; ``plain2`` is the noise floor. Found: an op that reads the head
input costs the step ~100-200 us at 2 threads whether it reads 1 row, 12 or all 128 (see
benchmarks/README.md, "Seventh pass").
"""
import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

torch.manual_seed(0)  # the model and data below: a script, so made at start-up
model = nn.Sequential(nn.Flatten(), nn.Linear(784,256), nn.ReLU(), nn.Linear(256,256), nn.ReLU(), nn.Linear(256,10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
X = torch.randn(43*128,1,28,28); Y = torch.randint(0,10,(43*128,))
POS = torch.arange(0, 128, 11)
MASK = np.random.default_rng(0).random(60000) < 0.09
IDS = np.random.default_rng(1).permutation(60000)[:128]
def sm(l): return l.grad_fn._saved_mat1
ARMS = {
 "plain": None,
 "graph": lambda l: sm(l),
 "zeros": lambda l: torch.zeros(128),
 "vnorm": lambda l: torch.linalg.vector_norm(sm(l), dim=1),
 "mulsum": lambda l: (lambda f: (f*f).sum(1))(sm(l)),
 "bmm": lambda l: (lambda f: torch.bmm(f.unsqueeze(1), f.unsqueeze(2)))(sm(l)),
 "numpy": lambda l: (lambda a: np.einsum("ij,ij->i", a, a))(sm(l).detach().numpy()),
 "sel12": lambda l: torch.linalg.vector_norm(sm(l).index_select(0, POS), dim=1),
 "sel12np": lambda l: torch.linalg.vector_norm(sm(l).index_select(0, torch.from_numpy(np.flatnonzero(MASK[IDS]))), dim=1),
 "f1row": lambda l: sm(l).narrow(0, 0, 1).sum(),
 "flast": lambda l: sm(l).narrow(0, 127, 1).sum(),
 "xrows": lambda l: X.narrow(0, 0, 12).sum(),
 "logsum": lambda l: l.detach().sum(),
 "plain2": None,
}


def run43(a, i0, kept):
    fn = ARMS[a]
    for i in range(i0, i0+43):
        x, y = X[(i%43)*128:(i%43+1)*128], Y[(i%43)*128:(i%43+1)*128]
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if fn is not None: kept.append(fn(logits))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    kept.clear()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("arms", nargs="?", default=",".join(ARMS), help="comma-separated, from: " + ", ".join(ARMS))
    args = parser.parse_args()
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown or "plain" not in args.arms.split(","):
        parser.error(f"arms {unknown} unknown or 'plain' missing; allowed: {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    arms = [a for a in ARMS if a in args.arms.split(",")]
    times = {a: [] for a in arms}; n = dict.fromkeys(arms, 0)
    for r in range(args.rounds + 1):
        spent = dict.fromkeys(arms, 0.0)
        for k in range(10):
            sh = (r+k) % len(arms)
            for a in arms[sh:] + arms[:sh]:
                t = time.perf_counter(); run43(a, n[a], []); n[a] += 43
                spent[a] += time.perf_counter() - t
        if r:
            for a in arms: times[a].append(spent[a])
    p = statistics.median(times["plain"])/430*1e6
    for a in arms:
        ratios = [t / q for t, q in zip(times[a], times["plain"])]
        m = statistics.median(ratios)
        print(f"{a:8s} {statistics.median(times[a])/430*1e6:7.0f} us/step  ratio {m:.4f}  ({(m-1)*p:+.0f} us)")


if __name__ == "__main__":
    main()
