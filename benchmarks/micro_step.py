"""The pieces of a P-1h EP training step timed alone, outside Lightning (the floors the profile is compared with).

    python benchmarks/micro_step.py [--T 40] [--K 15] [--batch 20] [--repeats 30]

Each piece runs in a tight loop on fixed data (weights and states in cache), ``--repeats`` rounds; the minimum and
the median of the per-call time are printed (one JSON line at the end). Measurements only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import machine

from ep_lightning.data import EpochShuffleSampler, PermutationBatchSampler, TensorPairDataset, keep_batch
from ep_lightning.divergence import finite_summary as _finite_summary
from ep_lightning.estimators import ep_surrogate
from ep_lightning.models import PrototypicalNet
from ep_lightning.relaxation import relax
from ep_lightning.runtime import tune_allocator


def clock(fn: Callable[[], object], calls: int, repeats: int) -> dict[str, float]:
    """min and median over ``repeats`` rounds of the mean time of one call (ms)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(1e3 * (time.perf_counter() - start) / calls)
    return {"min_ms": min(times), "median_ms": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=40)
    parser.add_argument("--K", type=int, default=15)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_allocator()
    torch.manual_seed(0)
    net = PrototypicalNet([784, 512, 10])
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (args.batch,)), 10).float()
    with torch.no_grad():
        drive = net.drive(x)
        free = relax(net, drive, net.init_state(x), args.T)
        nudged = relax(net, drive, free, args.K, 0.1, y)
    s1, s2 = free
    w1 = net.synapses[1].weight
    optimizer = torch.optim.SGD([{"params": g, "lr": 1e-9} for g in net.parameter_groups()], lr=0.0)
    params = list(net.parameters())
    states = [*free, *nudged]

    def phases() -> None:
        with torch.no_grad():
            d = net.drive(x)
            f = relax(net, d, net.init_state(x), args.T)
            relax(net, d, f, args.K, 0.1, y)

    def update() -> None:
        for p in params:
            p.grad = None
        ep_surrogate(net, x, free, nudged, (0.0, 0.1)).backward()

    update()
    images = torch.rand(60_000, 1, 28, 28)
    labels = torch.randint(0, 10, (60_000,))
    data = TensorPairDataset(images, labels)
    per_int = DataLoader(data, batch_size=args.batch, sampler=EpochShuffleSampler(60_000, 0), collate_fn=keep_batch)
    sliced = DataLoader(
        data, batch_sampler=PermutationBatchSampler(EpochShuffleSampler(60_000, 0), args.batch), collate_fn=keep_batch
    )
    n_batches = len(sliced)
    out = {
        "relaxation phases (drive, T free, K nudged steps)": clock(phases, 10, args.repeats),
        "one step (net.step)": clock(lambda: net.step(free, drive), 500, args.repeats),
        "  addmm to the hidden layer": clock(lambda: torch.addmm(drive.first, s2, w1, alpha=4.0), 500, args.repeats),
        "  addmm to the output layer": clock(
            lambda: torch.addmm(drive.biases[0], s1, w1.T, alpha=4.0), 500, args.repeats
        ),
        "  sigmoid_ hidden layer": clock(lambda: s1.clone().sigmoid_(), 500, args.repeats),
        "input drive (W_0 x once per batch)": clock(lambda: net.drive(x), 100, args.repeats),
        "EP surrogate + backward": clock(update, 20, args.repeats),
        "SGD step (4 tensors)": clock(optimizer.step, 100, args.repeats),
        "divergence guard sums (weights, states, gradients)": clock(
            lambda: bool(torch.isfinite(_finite_summary(params + states + [p.grad for p in params]))), 100, args.repeats
        ),
        "  of which the weights": clock(lambda: bool(torch.isfinite(_finite_summary(params))), 100, args.repeats),
        "batch fetch, per-sample int sampler": clock(lambda: sum(1 for _ in per_int) / n_batches, 1, 3),
        "batch fetch, permutation slices": clock(lambda: sum(1 for _ in sliced) / n_batches, 1, 3),
    }
    for key in ("batch fetch, per-sample int sampler", "batch fetch, permutation slices"):  # one pass = n batches
        out[key] = {k: v / n_batches for k, v in out[key].items()}
    for name, value in out.items():
        print(f"{name:56s} min {value['min_ms']:7.4f}  median {value['median_ms']:7.4f} ms")
    print(json.dumps({"T": args.T, "K": args.K, "batch": args.batch, "pieces": out, **machine()}))


if __name__ == "__main__":
    main()
