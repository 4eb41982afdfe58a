"""EP variants on MNIST: one-sided vs symmetric vs random-sign nudging, MSE output vs softmax/CE read-out.

For each architecture in ``--archs`` (``p1h``: configs/mnist/p1h_ep.yaml, ``pconv``: configs/mnist/pconv_ep.yaml) and
each (nudging, readout) cell, it trains through the project's CLI (the code path of ``python train.py fit``) with
only ``model.nudging`` and ``model.net.readout`` overridden — every other hyperparameter is the config's (the
2019 paper's) — then tests on the first ``--test-subset`` images of the official test set (all 10k by default).
Reports the test error, the mean wall time of a training epoch (without evaluation) and what was run. Prints a
markdown table; with ``--out`` keeps every finished cell in a JSON file (re-runs skip cached cells, so an interrupted
grid resumes) and writes the table next to it. Prints, never asserts.

    export OMP_NUM_THREADS=1
    python benchmarks/variants.py --archs p1h --epochs 3 --out /tmp/variants.json
    python benchmarks/variants.py --archs pconv --epochs 1 --train-subset 5000 --test-subset 2000 \
        --out /tmp/variants.json
    python benchmarks/variants.py --report-only --out /tmp/variants.json
    python benchmarks/variants.py --timing --archs p1h pconv      # ms per training batch, variants interleaved

``--timing`` measures the cost of the variants without the noise of a shared machine: in one process, the same
batches go through ``EquilibriumModule.ep_update`` + backward (free phase, nudged phase(s), update; the optimizer
step is the same for all variants and left out) for every variant in turn, over several rounds; it prints the
median milliseconds per batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from ep_lightning.cli import cli_main
from ep_lightning.data import MNISTDataModule
from ep_lightning.models import ConvPrototypicalNet, PrototypicalNet
from ep_lightning.systems import EquilibriumModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"p1h": ROOT / "configs/mnist/p1h_ep.yaml", "pconv": ROOT / "configs/mnist/pconv_ep.yaml"}
NUDGINGS = ("one_sided", "symmetric", "random_sign")
READOUTS = ("mse", "ce")


class EpochTimer(L.Callback):
    """Wall time of every training epoch (training batches only; no validation split is configured)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def run_cell(arch: str, nudging: str, readout: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one cell and test it; returns the record for the table."""
    overrides = [
        "--config",
        str(CONFIGS[arch]),
        "--model.init_args.nudging",
        nudging,
        "--model.init_args.net.init_args.readout",
        readout,
        "--trainer.max_epochs",
        str(args.epochs),
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        str(args.root),
        "--trainer.accelerator",
        "cpu",
        "--data.data_dir",
        str(ROOT / "data"),
        "--seed_everything",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--test_after_fit",
        "false",
    ]
    if args.train_subset:
        overrides += ["--data.train_subset", str(args.train_subset)]
    if args.test_subset:
        overrides += ["--data.test_subset", str(args.test_subset)]
    cli = cli_main(overrides, run=False)
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_acc = float(cli.trainer.callback_metrics["train/acc"])  # last epoch (the test run resets the metrics)
    start = time.perf_counter()
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    module = cli.model
    return {
        "arch": arch,
        "nudging": nudging,
        "readout": readout,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_images": len(cli.datamodule.train_set),
        "test_images": len(cli.datamodule.test_set),
        "T": module.T,
        "K": module.K,
        "beta": module.beta,
        "lrs": module.lrs,
        "test_error": 100.0 * (1.0 - float(metrics["test/acc"])),
        "train_error": 100.0 * (1.0 - train_acc),
        "epoch_s": sum(timer.times) / len(timer.times),
        "test_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }


def key(record: dict[str, Any]) -> tuple:
    return tuple(record[k] for k in ("arch", "nudging", "readout", "epochs", "train_images", "test_images", "seed"))


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| net | nudging | readout | epochs | train images | test images | test error (%) | train error (%) "
            "| time / epoch (s) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {n: i for i, n in enumerate(NUDGINGS)}
    for r in sorted(records, key=lambda r: (r["arch"], r["readout"], order[r["nudging"]])):
        lines.append(
            f"| {'P-1h' if r['arch'] == 'p1h' else 'P-conv'} | {r['nudging'].replace('_', '-')} "
            f"| {r['readout'].upper()} "
            f"| {r['epochs']} | {r['train_images']:,} | {r['test_images']:,} | {r['test_error']:.2f} "
            f"| {r['train_error']:.2f} | {r['epoch_s']:.1f} |"
        )
    return "\n".join(lines)


def build(arch: str, nudging: str, readout: str) -> EquilibriumModule:
    """The config's module with the variant's nudging and read-out (weights seeded identically for every variant)."""
    init = yaml.safe_load(CONFIGS[arch].read_text())["model"]["init_args"]
    net_args = {**init["net"]["init_args"], "readout": readout}
    torch.manual_seed(0)
    net = PrototypicalNet(**net_args) if arch == "p1h" else ConvPrototypicalNet(**net_args)
    return EquilibriumModule(net, T=init["T"], K=init["K"], beta=init["beta"], lrs=init["lrs"], nudging=nudging)


def time_variants(arch: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median ms per batch of ep_update + backward for every (readout, nudging), interleaved over ``rounds``."""
    data = MNISTDataModule(data_dir=str(ROOT / "data"), train_subset=args.timing_batches * 20)
    data.setup("fit")
    batches = [data.train_set[i * 20 : (i + 1) * 20] for i in range(args.timing_batches)]
    modules = {(r, n): build(arch, n, r) for r in args.readouts for n in args.nudgings}
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in modules}
    for _ in range(args.timing_rounds):
        for k, module in modules.items():
            for x, labels in batches:
                target = module.net.encode_target(labels, x)
                start = time.perf_counter()
                loss = module.ep_update(x, target, module.net.init_state(x))[0]
                loss.backward()
                samples[k].append(1000.0 * (time.perf_counter() - start))
    out = []
    for (readout, nudging), times in samples.items():
        times.sort()
        out.append({"arch": arch, "readout": readout, "nudging": nudging, "ms_per_batch": times[len(times) // 2]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["p1h"], choices=sorted(CONFIGS))
    parser.add_argument("--nudgings", nargs="+", default=list(NUDGINGS), choices=NUDGINGS)
    parser.add_argument("--readouts", nargs="+", default=list(READOUTS), choices=READOUTS)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all 60k)")
    parser.add_argument("--test-subset", type=int, default=None, help="first N test images (default: all 10k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=Path("/tmp/ep_variants_runs"), help="trainer default_root_dir")
    parser.add_argument("--out", type=Path, default=None, help="JSON cache of finished cells (+ .md table)")
    parser.add_argument("--report-only", action="store_true", help="print the table of the cached cells and exit")
    parser.add_argument("--timing", action="store_true", help="only time the variants per batch (see above)")
    parser.add_argument("--timing-batches", type=int, default=20)
    parser.add_argument("--timing-rounds", type=int, default=3)
    args = parser.parse_args()

    if args.timing:
        torch.set_num_threads(args.threads)
        print("| net | readout | nudging | ms / batch of 20 (median) |\n|---|---|---|---|")
        for arch in args.archs:
            for r in time_variants(arch, args):
                print(
                    f"| {'P-1h' if arch == 'p1h' else 'P-conv'} | {r['readout'].upper()} "
                    f"| {r['nudging'].replace('_', '-')} | {r['ms_per_batch']:.1f} |",
                    flush=True,
                )
        return

    records: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    if not args.report_only:
        for arch in args.archs:
            for readout in args.readouts:
                for nudging in args.nudgings:
                    probe = {
                        "arch": arch,
                        "nudging": nudging,
                        "readout": readout,
                        "epochs": args.epochs,
                        "seed": args.seed,
                    }
                    cached = [
                        r
                        for r in records
                        if all(r[k] == v for k, v in probe.items())
                        and (args.train_subset is None or r["train_images"] == args.train_subset)
                        and (args.test_subset is None or r["test_images"] == args.test_subset)
                    ]
                    if cached:
                        continue
                    record = run_cell(arch, nudging, readout, args)
                    print(json.dumps(record), flush=True)
                    records = [r for r in records if key(r) != key(record)] + [record]
                    if args.out:
                        args.out.write_text(json.dumps(records, indent=1))
    text = table(records)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
