"""Run Table-1 configs over seeds, several runs at once on one device, and print test error mean ± std per config.

    python benchmarks/table1.py --epochs 1 [--configs p1h_ep p1h_bptt …] [--seeds 0 1 2] [--jobs N]
        [--train_subset N] [--test_subset N] [--accelerator auto|cpu|cuda] [--set key=value …] [--out runs_table1]

Each (config, seed) runs as ``python train.py fit --config configs/mnist/<name>.yaml --seed_everything <seed>
--trainer.max_epochs E …`` in a subprocess (the real CLI, test after fit on the official 10k test set); ``--jobs N``
keeps N of them running at once (on one GPU they share the device; on a CPU give each one thread, the default).
Per run: test error, exit status, wall time and samples/s (training images × epochs / wall time of the whole command:
start-up and the final test included, so a lower bound of the training rate). Per config: test error mean ± std over
the runs that trained, the number of diverged runs — a run that raised the divergence error, exited non-zero, or
ended at chance accuracy (test accuracy < ``CHANCE_ACC``) — and the aggregate samples/s of all runs together.
Writes ``<out>/table1.json`` and ``<out>/table1.md``; logs of every run in ``<out>/<config>_s<seed>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # Ernoult et al. 2019, Table 1: test error (%) EP / BPTT, epochs
    "p1h": ("2.00", "2.00", 30),
    "p2h": ("1.95", "2.09", 50),
    "p3h": ("2.01", "2.30", 100),
    "eb1h": ("2.06", "2.11", 30),
    "eb2h": ("2.01", "2.02", 50),
    "pconv": ("1.02", "0.88", 40),
}
#: Ten classes: a network collapsed to one class scores ≈ 10 %; below 15 % a run counts as diverged.
CHANCE_ACC = 0.15
MNIST_TRAIN = 60_000
TEST_ACC = re.compile(r"test/acc\s*[│|]?\s*([0-9.]+)")


@dataclass
class Run:
    """One (config, seed) subprocess and what came out of it."""

    config: str
    seed: int
    train_images: int
    log: str
    returncode: int | None = None
    test_acc: float | None = None
    test_error: float | None = None
    seconds: float = 0.0
    samples_per_s: float | None = None
    diverged: bool = False
    reason: str = ""
    command: list[str] = field(default_factory=list)


def train_images(config: str, train_subset: int | None) -> int:
    """Training images of a run: ``train_subset`` if given, else 60k minus the config's validation split."""
    if train_subset:
        return train_subset
    data = yaml.safe_load((ROOT / "configs" / "mnist" / f"{config}.yaml").read_text()).get("data") or {}
    return MNIST_TRAIN - int((data.get("init_args") or {}).get("val_size", 0) or 0)


def classify(returncode: int | None, output: str) -> tuple[float | None, bool, str]:
    """(test accuracy or None, diverged, reason) from a finished run's exit status and output."""
    match = TEST_ACC.findall(output)
    acc = float(match[-1]) if match else None
    if returncode is None:
        return acc, True, "killed (timeout)"
    # cli_main prints a divergence as one line "error: …" and exits 1 (other user errors exit 2).
    if "DivergenceError" in output or (returncode == 1 and re.search(r"^error: ", output, re.MULTILINE)):
        return acc, True, "divergence error"
    if returncode != 0:
        last = next((line for line in reversed(output.strip().splitlines()) if line.strip()), "")
        return acc, True, f"exit {returncode}: {last[:200]}"
    if acc is None:
        return None, True, "no test accuracy in the output"
    if acc < CHANCE_ACC:
        return acc, True, f"chance accuracy ({100 * acc:.1f} %)"
    return acc, False, ""


def command(config: str, seed: int, args: argparse.Namespace) -> list[str]:
    cmd = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        f"configs/mnist/{config}.yaml",
        "--seed_everything",
        str(seed),
        "--trainer.max_epochs",
        str(args.epochs),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(args.out),
        "--trainer.logger.init_args.name",
        f"{config}_s{seed}",
    ]
    if args.accelerator:
        cmd += ["--trainer.accelerator", args.accelerator, "--trainer.devices", "1"]
    if args.train_subset:
        cmd += ["--data.init_args.train_subset", str(args.train_subset)]
    if args.test_subset:
        cmd += ["--data.init_args.test_subset", str(args.test_subset)]
    for item in args.set:
        key, value = item.split("=", 1)
        cmd += [f"--{key}", value]
    return cmd


def run_all(runs: list[Run], jobs: int, epochs: int, timeout: float | None) -> float:
    """Run every ``Run`` with at most ``jobs`` at once; fills in the results; returns the wall time of all."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    pending, active = list(runs), []
    start_all = time.perf_counter()
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            log = open(run.log, "w")  # noqa: SIM115 - closed when the run ends
            proc = subprocess.Popen(run.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            active.append((run, proc, log, time.perf_counter()))
        time.sleep(0.2)
        for item in list(active):
            run, proc, log, start = item
            elapsed = time.perf_counter() - start
            if proc.poll() is None and not (timeout and elapsed > timeout):
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                returncode = None
            else:
                returncode = proc.returncode
            log.close()
            active.remove(item)
            run.seconds = round(elapsed, 1)
            run.returncode = returncode
            output = Path(run.log).read_text(errors="replace")
            run.test_acc, run.diverged, run.reason = classify(returncode, output)
            run.test_error = round(100 * (1 - run.test_acc), 2) if run.test_acc is not None else None
            run.samples_per_s = round(run.train_images * epochs / elapsed, 1) if returncode == 0 else None
            print(
                f"  {run.config} seed {run.seed}: "
                f"{'diverged (' + run.reason + ')' if run.diverged else f'{run.test_error:.2f} %'}, "
                f"{run.seconds:.0f} s",
                flush=True,
            )
    return time.perf_counter() - start_all


def summarize(runs: list[Run], wall: float, epochs: int) -> dict[str, dict]:
    """Per config: test error mean ± std over the runs that trained, diverged count, aggregate samples/s."""
    out: dict[str, dict] = {}
    for config in dict.fromkeys(r.config for r in runs):
        mine = [r for r in runs if r.config == config]
        errors = [r.test_error for r in mine if not r.diverged and r.test_error is not None]
        trained = sum(r.train_images * epochs for r in mine if r.returncode == 0)
        out[config] = {
            "runs": len(mine),
            "seeds": [r.seed for r in mine],
            "diverged": sum(r.diverged for r in mine),
            "test_error_mean": round(statistics.mean(errors), 2) if errors else None,
            "test_error_std": round(statistics.stdev(errors), 2) if len(errors) > 1 else None,
            "samples_per_s_per_run": [r.samples_per_s for r in mine],
            "seconds_per_run": [r.seconds for r in mine],
            "trained_samples": trained,
        }
    out["_all"] = {
        "wall_s": round(wall, 1),
        "aggregate_samples_per_s": round(sum(v["trained_samples"] for v in out.values()) / wall, 1)
        if wall > 0
        else None,
    }
    return out


def markdown(runs: list[Run], summary: dict, args: argparse.Namespace) -> str:
    subset = f" on {args.train_subset} images" if args.train_subset else ""
    head = (
        f"Epochs: {args.epochs}{subset}; seeds {' '.join(map(str, args.seeds))}; {args.jobs} run(s) at once; "
        f"wall time {summary['_all']['wall_s']:.0f} s; aggregate {summary['_all']['aggregate_samples_per_s']:,} "
        "samples/s (all runs together, whole commands)."
    )
    lines = [
        head,
        "",
        "| config | paper test error (epochs) | ours: test error, mean ± std | seeds | diverged | samples/s per run |",
        "|---|---|---|---|---|---|",
    ]
    for config, s in summary.items():
        if config == "_all":
            continue
        model, algorithm = config.rsplit("_", 1) if "_" in config else (config, "")
        paper = PAPER.get(model)
        paper_txt = (
            f"{paper[0] if algorithm == 'ep' else paper[1]} % ({paper[2]})"
            if paper and algorithm in ("ep", "bptt")
            else "—"
        )
        err = (
            "—"
            if s["test_error_mean"] is None
            else (
                f"{s['test_error_mean']:.2f} %"
                + (f" ± {s['test_error_std']:.2f}" if s["test_error_std"] is not None else "")
            )
        )
        rates = ", ".join("—" if r is None else f"{r:,.0f}" for r in s["samples_per_s_per_run"])
        lines.append(f"| {config} | {paper_txt} | {err} | {len(s['seeds'])} | {s['diverged']} | {rates} |")
    diverged = [r for r in runs if r.diverged]
    if diverged:
        lines += ["", "Diverged runs: " + "; ".join(f"{r.config} seed {r.seed} ({r.reason})" for r in diverged)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=[f"{m}_{a}" for m in PAPER for a in ("ep", "bptt")])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (subprocesses sharing the device)")
    parser.add_argument("--train_subset", type=int, default=None)
    parser.add_argument("--test_subset", type=int, default=None)
    parser.add_argument("--accelerator", default=None, help="trainer.accelerator for every run (default: the config's)")
    parser.add_argument("--timeout", type=float, default=None, help="kill a run after this many seconds")
    parser.add_argument("--set", nargs="*", default=[], help="extra CLI overrides key=value for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs_table1")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} is invalid: use 1 or more runs at once")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [
        Run(
            config,
            seed,
            train_images(config, args.train_subset),
            str(args.out / f"{config}_s{seed}.log"),
            command=command(config, seed, args),
        )
        for config in args.configs
        for seed in args.seeds
    ]
    print(f"{len(runs)} runs, {args.jobs} at once", flush=True)
    wall = run_all(runs, args.jobs, args.epochs, args.timeout)
    summary = summarize(runs, wall, args.epochs)
    table = markdown(runs, summary, args)
    (args.out / "table1.json").write_text(
        json.dumps(
            {"runs": [asdict(r) for r in runs], "summary": summary, "args": {k: str(v) for k, v in vars(args).items()}},
            indent=1,
        )
    )
    (args.out / "table1.md").write_text(table)
    print(table)
    return summary


if __name__ == "__main__":
    main()
