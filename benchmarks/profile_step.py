"""Where the host time of one EP training step goes: Lightning's loop and hooks, the optimizer wrapper, data fetch,
metrics, the relaxation (kernels against Python), the contrast and the backward pass.

    python benchmarks/profile_step.py [--config configs/mnist/p1h_ep.yaml] [--batches 300] [--warmup 30]
        [--set model.init_args.T=40 model.init_args.K=15] [--json out.json]

Three passes over the same system, built from the config through the CLI (CPU, one thread unless ``--threads``):

1. **Lightning**: ``trainer.fit`` with wall-clock timers wrapped around the pieces of the step (the system's methods
   and the functions its module calls, where they exist); the time between the end of one batch and the start of the
   next is the loop's own work (fetching and collating the next batch, progress tracking, hooks).
2. **Bare loop**: the same arithmetic (relaxation phases, EP surrogate, backward, ``torch.optim`` step) in a plain
   Python loop over the same batches, without Lightning.
3. **Relaxation**: ``torch.profiler`` over the relaxation phases alone: which operators, how many calls per batch
   (the profiler's own per-operator overhead is counted in the operators, so their sum may exceed the wall time).
4. **Update**: ``torch.profiler`` over the EP surrogate, its backward and the SGD step on one relaxed batch.

Prints one table of milliseconds per batch; ``--json`` also writes it. Measurements only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import QUIET_TRAINER, inner_network, machine

from ep_lightning.cli import cli_main
from ep_lightning.runtime import configure_threads, tune_allocator

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
ACTIVE = {"on": False}


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its wall time added to TIMES[name] while timing is on."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not ACTIVE["on"]:
            return fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start
            CALLS[name] += 1

    return wrapper


def wrap_attr(owner: Any, attr: str, name: str, found: list[str]) -> None:
    """Replace ``owner.attr`` by its timed version if it exists (names differ between versions of the systems)."""
    fn = getattr(owner, attr, None)
    if callable(fn):
        setattr(owner, attr, timed(name, fn))
        found.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}")


class BatchClock(L.Callback):
    """Hook-to-hook time of each batch, and the loop's time between one batch's end and the next one's start."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.in_batch: list[float] = []
        self.between: list[float] = []
        self._start = self._end = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx >= self.warmup:
            ACTIVE["on"] = True
            if self._end is not None:
                self.between.append(now - self._end)
        self._start = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx >= self.warmup:
            self.in_batch.append(now - self._start)
        self._end = now


def build(args: argparse.Namespace, batches: int) -> Any:
    overrides = []
    for item in args.set:
        key, value = item.split("=", 1)
        overrides += [f"--{key}", value]
    return cli_main(
        [
            "--config",
            args.config,
            *QUIET_TRAINER,
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            str(batches),
            "--trainer.limit_val_batches",
            "0",
            "--test_after_fit",
            "false",
            "--trainer.default_root_dir",
            "/tmp/ep_profile",
            "--threads",
            str(torch.get_num_threads()),
            *overrides,
        ],
        run=False,
    )


def lightning_pass(args: argparse.Namespace) -> tuple[dict[str, float], list[str], Any]:
    """Pass 1: ms per batch of every timed piece inside ``trainer.fit``."""
    cli = build(args, args.warmup + args.batches)
    module, trainer, datamodule = cli.model, cli.trainer, cli.datamodule
    found: list[str] = []
    import ep_lightning.systems.estimator as system_module

    for attr, name in (
        ("ep_surrogate", "EP surrogate (contrast)"),
        ("bptt_loss", "BPTT loss"),
    ):
        wrap_attr(system_module, attr, name, found)
    for attr, name in (
        ("training_step", "training_step (total)"),
        ("phases", "relaxation phases"),
        ("check_training_step", "divergence guard"),
        ("manual_backward", "manual_backward"),
        ("optimizers", "self.optimizers()"),
        ("log", "self.log"),
        ("initial_state", "initial state"),
        ("draw_nudging_pair", "nudging pair"),
    ):
        wrap_attr(module, attr, name, found)
    net = inner_network(module)
    for attr, name in (("encode_target", "encode target"), ("output", "output"), ("cost", "cost (loss metric)")):
        wrap_attr(net, attr, name, found)
    if hasattr(module, "train_means"):
        wrap_attr(module.train_means, "update", "epoch metrics update", found)

    class WrapOptimizer(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            lightning_opt = pl_module.optimizers()
            wrap_attr(lightning_opt, "step", "LightningOptimizer.step (total)", found)
            wrap_attr(lightning_opt, "zero_grad", "zero_grad", found)
            wrap_attr(lightning_opt.optimizer, "step", "torch SGD.step", found)

    clock = BatchClock(args.warmup)
    trainer.callbacks += [WrapOptimizer(), clock]
    datamodule.setup("fit")
    wrap_attr(datamodule.train_set, "__getitems__", "dataset indexing (batch)", found)
    trainer.fit(module, datamodule=datamodule)
    ACTIVE["on"] = False
    n = len(clock.in_batch)
    ms = {k: 1e3 * v / n for k, v in TIMES.items()}
    ms["batch, hook to hook"] = 1e3 * sum(clock.in_batch) / n
    ms["loop between batches (fetch, transfer, progress, hooks)"] = (
        1e3 * sum(clock.between) / max(len(clock.between), 1)
    )
    ms["batch, median hook to hook"] = 1e3 * statistics.median(clock.in_batch)
    return ms, found, cli


def update_parts(cli: Any) -> tuple[Any, Any, Callable, Callable, torch.optim.Optimizer] | None:
    """(system, net, unwrapped phase runner, unwrapped EP surrogate, a tiny-lr SGD over the net's groups), or None
    for a system without EP phases."""
    module = cli.model
    net = inner_network(module)
    if not hasattr(module, "phases"):
        return None
    from ep_lightning.systems import estimator as system_module

    surrogate = getattr(system_module.ep_surrogate, "__wrapped__", system_module.ep_surrogate)
    phases = getattr(module.phases, "__wrapped__", module.phases)
    optimizer = torch.optim.SGD([{"params": g, "lr": 1e-6} for g in net.parameter_groups()], lr=1e-6)
    return module, net, phases, surrogate, optimizer


def bare_pass(args: argparse.Namespace, cli: Any) -> dict[str, float]:
    """Pass 2: the same step in a plain loop (relaxation phases, surrogate, backward, SGD), no Lightning."""
    parts = update_parts(cli)
    if parts is None:
        return {}
    module, net, phases, surrogate, optimizer = parts
    loader = cli.datamodule.train_dataloader()
    batches = [b for _, b in zip(range(args.batches), loader)]
    times = {"relaxation": 0.0, "surrogate": 0.0, "backward": 0.0, "step": 0.0, "total": 0.0}
    for i, batch in enumerate(batches + batches[: args.warmup]):
        x, labels = batch[0], batch[1]
        t0 = time.perf_counter()
        target = net.encode_target(labels, x)
        optimizer.zero_grad()
        free, _, nudged = phases(x, target, net.init_state(x), (0.0, module.beta))
        t1 = time.perf_counter()
        loss = surrogate(net, x, free, nudged, (0.0, module.beta))
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if i >= args.warmup:  # the first warm-up batches are repeated at the end so every batch is timed once
            for key, dt in (
                ("relaxation", t1 - t0),
                ("surrogate", t2 - t1),
                ("backward", t3 - t2),
                ("step", t4 - t3),
                ("total", t4 - t0),
            ):
                times[key] += dt
    n = len(batches) + min(args.warmup, len(batches)) - args.warmup
    return {k: 1e3 * v / max(n, 1) for k, v in times.items()}


def relaxation_pass(args: argparse.Namespace, cli: Any) -> dict[str, Any]:
    """Pass 3: aten operators' self CPU time inside the relaxation phases against their wall time."""
    module = cli.model
    net = inner_network(module)
    if not hasattr(module, "phases"):
        return {}
    phases = getattr(module.phases, "__wrapped__", module.phases)
    batch = next(iter(cli.datamodule.train_dataloader()))
    x, labels = batch[0], batch[1]
    target = net.encode_target(labels, x)
    reps = max(20, args.batches // 10)
    for _ in range(5):
        phases(x, target, net.init_state(x), (0.0, module.beta))
    start = time.perf_counter()
    for _ in range(reps):
        phases(x, target, net.init_state(x), (0.0, module.beta))
    wall = (time.perf_counter() - start) / reps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            phases(x, target, net.init_state(x), (0.0, module.beta))
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    self_us = sum(e.self_cpu_time_total for e in ops) / reps
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    steps = module.T + module.K if hasattr(module, "K") else None
    return {
        "wall_ms": 1e3 * wall,
        "aten_self_ms": self_us / 1e3,
        "steps": steps,
        "top_ops": [
            {"op": e.key, "ms_per_batch": e.self_cpu_time_total / reps / 1e3, "calls_per_batch": e.count / reps}
            for e in top
        ],
    }


def update_pass(args: argparse.Namespace, cli: Any) -> dict[str, Any]:
    """Pass 4: the update after the relaxation (EP surrogate, backward, SGD step) under ``torch.profiler``."""
    parts = update_parts(cli)
    if parts is None:
        return {}
    module, net, phases, surrogate, optimizer = parts
    batch = next(iter(cli.datamodule.train_dataloader()))
    x, labels = batch[0], batch[1]
    target = net.encode_target(labels, x)
    free, _, nudged = phases(x, target, net.init_state(x), (0.0, module.beta))
    reps = max(20, args.batches // 10)

    def update() -> None:
        optimizer.zero_grad()
        surrogate(net, x, free, nudged, (0.0, module.beta)).backward()
        optimizer.step()

    for _ in range(5):
        update()
    start = time.perf_counter()
    for _ in range(reps):
        update()
    wall = (time.perf_counter() - start) / reps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            update()
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "wall_ms": 1e3 * wall,
        "aten_self_ms": sum(e.self_cpu_time_total for e in ops) / reps / 1e3,
        "top_ops": [
            {"op": e.key, "ms_per_batch": e.self_cpu_time_total / reps / 1e3, "calls_per_batch": e.count / reps}
            for e in top
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist/p1h_ep.yaml")
    parser.add_argument("--batches", type=int, default=300, help="timed batches")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], help="extra CLI overrides key=value")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    configure_threads(args.threads)
    tune_allocator()

    lightning_ms, found, cli = lightning_pass(args)
    bare_ms = bare_pass(args, cli)
    relax = relaxation_pass(args, cli)
    upd = update_pass(args, cli)

    total = (
        lightning_ms["batch, hook to hook"] + lightning_ms["loop between batches (fetch, transfer, progress, hooks)"]
    )
    print(f"{args.config} {' '.join(args.set)}: {args.batches} batches, 1 thread = {torch.get_num_threads() == 1}")
    print(f"{'piece':58s} {'ms/batch':>9s}")
    print(f"{'whole batch (end of one to end of next)':58s} {total:9.3f}")
    for key, value in sorted(lightning_ms.items(), key=lambda kv: -kv[1]):
        print(f"  {key:56s} {value:9.3f}")
    if bare_ms:
        print(f"{'bare loop, same arithmetic, no Lightning':58s} {bare_ms['total']:9.3f}")
        for key in ("relaxation", "surrogate", "backward", "step"):
            print(f"  {key:56s} {bare_ms[key]:9.3f}")
        print(f"{'framework cost (whole batch − bare loop)':58s} {total - bare_ms['total']:9.3f}")
    if relax:
        print(f"{'relaxation phases alone (wall)':58s} {relax['wall_ms']:9.3f}")
        print(f"  {'aten operators, self CPU time (profiler overhead included)':56s} {relax['aten_self_ms']:9.3f}")
        print(f"  {'per step (wall / steps)':56s} {relax['wall_ms'] / max(relax['steps'] or 1, 1):9.3f}")
        for op in relax["top_ops"]:
            print(f"    {op['op']:54s} {op['ms_per_batch']:9.3f}  ({op['calls_per_batch']:.0f} calls)")
    if upd:
        print(f"{'update alone: surrogate, backward, SGD step (wall)':58s} {upd['wall_ms']:9.3f}")
        print(f"  {'aten operators, self CPU time (profiler overhead included)':56s} {upd['aten_self_ms']:9.3f}")
        for op in upd["top_ops"]:
            print(f"    {op['op']:54s} {op['ms_per_batch']:9.3f}  ({op['calls_per_batch']:.0f} calls)")
    result = {
        "config": args.config,
        "overrides": args.set,
        "batches": args.batches,
        "lightning_ms": lightning_ms,
        "timed": found,
        "bare_loop_ms": bare_ms,
        "relaxation": relax,
        "update": upd,
        "whole_batch_ms": total,
        **machine(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
