"""Initialized EP vs plain EP against the number of negative-phase steps T⁻ (O'Connor et al. 2019, 784-500-10).

For every T⁻ in ``--steps`` and seed in ``--seeds`` it trains, through the project's CLI (the code path of
``python train.py fit``), with T⁻ overridden:

- ``configs/mnist/iep_1h.yaml`` once per anchor strength λ in ``--lams`` (IEP),
- ``configs/mnist/iep_1h_ep_baseline.yaml`` (plain EP from zero, λ = 0),

then tests on the official MNIST test set: for IEP the error of s^f (the initializer alone, no relaxation) and of
s⁻ (s^f refined by T⁻ steps), for EP the error of s⁻ (T⁻ steps from zero). Evaluation uses T⁻ relaxation steps (the
authors' protocol). A validation curve (``--val-batches`` × 1000 images of the 10k split, after every epoch) shows
when a run collapses. Writes a markdown table and JSON next to the figure (``--out``). Prints, never asserts.

Runs already in the JSON with the same settings are reused (``--no-cache`` to re-run); ``--report-only`` makes the
table and figure from every cached run with the given epochs/subsets. The paper's protocol (50 epochs on 50k
images) takes days on a CPU; docs/img/iep_negative_steps.* are a shortened run (5 epochs × 10k images, 20 runs,
≈ 13 min on a loaded 2-core machine), made with:

    export OMP_NUM_THREADS=1
    python benchmarks/iep_negative_steps.py --epochs 5 --train-subset 10000                       # λ 0.1 vs EP, seed 0
    python benchmarks/iep_negative_steps.py --epochs 5 --train-subset 10000 --lams 0.1 1 --seeds 0  # + λ 1
    python benchmarks/iep_negative_steps.py --epochs 5 --train-subset 10000 --lams 0.1 1 --seeds 0 1 2 --steps 2 4
    python benchmarks/iep_negative_steps.py --epochs 5 --train-subset 10000 --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ep_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
IEP_CONFIG = ROOT / "configs/mnist/iep_1h.yaml"
EP_CONFIG = ROOT / "configs/mnist/iep_1h_ep_baseline.yaml"


class EpochErrors(L.Callback):
    """Collects the validation errors at the end of every validation epoch (the learning curve)."""

    def __init__(self) -> None:
        self.curve: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        names = {"val/acc": "err", "val/init_acc": "err_init"}  # errors = 1 − accuracy
        self.curve.append({name: 1.0 - float(metrics[k]) for k, name in names.items() if k in metrics})


def label_of(lam: float | None) -> str:
    """Display name of a run family: ``EP`` or ``IEP λ=<lam>``."""
    return "EP" if lam is None else f"IEP λ={lam:g}"


def settings_key(label: str, t_minus: int, seed: int, args: argparse.Namespace) -> str:
    """Everything that determines a run's result (used to reuse cached runs)."""
    data = f"epochs={args.epochs}|train={args.train_subset}|test={args.test_subset}|val={args.val_batches}"
    return f"{label}|T-={t_minus}|seed={seed}|{data}"


def run_one(lam: float | None, t_minus: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one configuration (λ None: the EP baseline) with T⁻ = ``t_minus`` and return its test errors."""
    overrides = [] if lam is None else ["--model.init_args.lam", str(lam)]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads only `args`; keep it from seeing ours
    try:
        cli = cli_main(
            [
                "--config",
                str(EP_CONFIG if lam is None else IEP_CONFIG),
                "--seed_everything",
                str(seed),
                "--model.init_args.T",
                str(t_minus),
                *overrides,
                "--trainer.max_epochs",
                str(args.epochs),
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.callbacks",
                "[]",
                "--trainer.num_sanity_val_steps",
                "0",
                "--trainer.limit_val_batches",
                str(args.val_batches),
                "--trainer.default_root_dir",
                str(args.work_dir),
                "--data.data_dir",
                str(ROOT / "data"),
                "--data.train_subset",
                str(args.train_subset),
                *(["--data.test_subset", str(args.test_subset)] if args.test_subset else []),
            ],
            run=False,
        )
    finally:
        sys.argv = argv
    curve = EpochErrors()
    cli.trainer.callbacks.append(curve)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    train_err = 1.0 - float(cli.trainer.callback_metrics.get("train/acc", math.nan))  # before test() resets them
    (test,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    result = {
        "label": label_of(lam),
        "lam": lam,
        "T_minus": t_minus,
        "seed": seed,
        "test_err": 1.0 - test["test/acc"],
        "test_err_init": 1.0 - test["test/init_acc"] if "test/init_acc" in test else None,
        "train_err": train_err,
        "val_curve": curve.curve,
        "train_seconds": seconds,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "val_curve"}), flush=True)
    return result


def cell(runs: list[dict[str, Any]], key: str) -> str:
    """Test error (%) of the runs (one per seed), separated by slashes."""
    if not runs or runs[0][key] is None:
        return "–"
    return " / ".join(f"{100 * r[key]:.1f}" for r in sorted(runs, key=lambda r: r["seed"]))


def table(results: list[dict[str, Any]], args: argparse.Namespace, labels: list[str]) -> str:
    """Markdown table: test error (%) of s^f and s⁻ per T⁻ and run family (one value per seed)."""
    seeds = " / ".join(str(s) for s in args.seeds)
    header = ["T⁻"]
    for label in labels:
        header += [f"{label}: s⁻"] if label == "EP" else [f"{label}: s^f", f"{label}: s⁻"]
    lines = [
        (
            f"Test error (%) on the official MNIST test set (10k) after {args.epochs} epoch(s) on {args.train_subset} "
            f"training images of the 50k split (784-500-10, β ±0.5, T⁺ 4, ε 0.5, batch 20; evaluation with T⁻ steps; "
            f"seeds {seeds}; one value per seed that was run, in seed order). s^f: initializer alone; s⁻: after T⁻ "
            f"steps (from s^f for IEP, from zero for EP). 90 % = collapsed to one class."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
    ]
    for t in args.steps:
        row = [str(t)]
        for label in labels:
            runs = [r for r in results if r["label"] == label and r["T_minus"] == t]
            row += [cell(runs, "test_err")] if label == "EP" else [cell(runs, "test_err_init"), cell(runs, "test_err")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict[str, Any]], args: argparse.Namespace, labels: list[str], path: Path) -> None:
    """Left: test error against T⁻ (median over seeds, every seed as a dot). Right: validation curves, first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = []
    for i, label in enumerate(labels):
        series.append((label, "test_err", f"{label}: $s^-$", f"C{i}", "--" if label == "EP" else "-"))
        if label != "EP":
            series.append((label, "test_err_init", f"{label}: $s^f$ (initializer alone)", f"C{i}", ":"))
    for label, key, name, color, style in series:
        xs, medians = [], []
        for t in args.steps:
            values = [100 * r[key] for r in results if r["label"] == label and r["T_minus"] == t]
            if values:
                xs.append(t)
                medians.append(float(torch.tensor(values).median()))
                ax.scatter([t] * len(values), values, color=color, s=12, alpha=0.6)
        ax.plot(xs, medians, style, color=color, marker="o" if key == "test_err" else "s", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(args.steps, [str(t) for t in args.steps])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(
        xlabel="negative-phase steps $T^-$",
        ylabel="test error (%)",
        title=f"784-500-10, {args.epochs} epochs × {args.train_subset // 1000}k images, seeds {args.seeds}",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    first = min(args.seeds)
    for j, t in enumerate(args.steps):
        for i, label in enumerate(labels):
            runs = [r for r in results if r["label"] == label and r["T_minus"] == t and r["seed"] == first]
            if runs:
                curve = runs[0]["val_curve"]
                ax_curve.plot(
                    range(1, len(curve) + 1),
                    [100 * c["err"] for c in curve],
                    ["-", "--", "-.", ":"][i % 4],
                    color=f"C{j}",
                    label=f"{label}, $T^-$={t}",
                )
    ax_curve.set_yscale("log")
    ax_curve.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_curve.set(xlabel="epoch", ylabel="validation error of $s^-$ (%)", title=f"learning curves (seed {first})")
    ax_curve.grid(True, which="both", alpha=0.3)
    ax_curve.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 10, 20], help="values of T⁻")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.1], help="anchor strengths λ of the IEP runs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-EP runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=10000, help="training images (of the 50k split)")
    parser.add_argument("--test-subset", type=int, default=None, help="test images (default: all 10k)")
    parser.add_argument("--val-batches", type=int, default=2, help="validation batches of 1000 per epoch (curve)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/img/iep_negative_steps.png")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/iep_negative_steps"))
    parser.add_argument("--no-cache", action="store_true", help="re-run runs already stored in the JSON")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: table and figure of every cached run with these epochs/subsets (any T⁻, λ, seed)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    json_path = args.out.with_suffix(".json")
    cache: dict[str, dict[str, Any]] = {}
    if json_path.is_file() and not args.no_cache:
        cache = {r["key"]: r for r in json.loads(json_path.read_text()).get("results", []) if "key" in r}
    families: list[float | None] = list(args.lams) + ([] if args.no_baseline else [None])
    results = []
    if args.report_only:
        suffix = settings_key("", 0, 0, args).split("|", 3)[3]  # epochs|train|test|val
        results = [r for k, r in cache.items() if k.endswith(suffix)]
        if not results:
            raise SystemExit(f"no cached run in {json_path} with {suffix}")
        families = sorted({r["lam"] for r in results}, key=lambda v: math.inf if v is None else v)
        args.steps = sorted({r["T_minus"] for r in results})
        args.seeds = sorted({r["seed"] for r in results})
    labels = [label_of(lam) for lam in families]
    for t in [] if args.report_only else args.steps:
        for seed in args.seeds:
            for lam in families:
                key = settings_key(label_of(lam), t, seed, args)
                result = cache.get(key) or {**run_one(lam, t, seed, args), "key": key}
                results.append(result)
                cache[key] = result
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps({"results": list(cache.values())}, indent=1))  # progress survives
    md = table(results, args, labels)
    print(md)
    args.out.with_suffix(".md").write_text(md)
    figure(results, args, labels, args.out)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {json_path}")


if __name__ == "__main__":
    main()
