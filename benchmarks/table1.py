"""Run Table-1 configs for a given number of epochs and print a markdown table of test error and time per epoch.

    python benchmarks/table1.py --epochs 1 [--configs p1h_ep p1h_bptt …] [--train_subset N] [--out runs_table1]

Each config runs as `python train.py fit --config configs/mnist/<name>.yaml --trainer.max_epochs E …` in a
subprocess (the real CLI, test after fit on the official 10k test set). Time per epoch is the wall time of the whole
command divided by the epochs run, so it includes start-up and the final test (an upper bound).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # Ernoult et al. 2019, Table 1: test error (%) EP / BPTT, epochs
    "p1h": ("2.00", "2.00", 30), "p2h": ("1.95", "2.09", 50), "p3h": ("2.01", "2.30", 100),
    "eb1h": ("2.06", "2.11", 30), "eb2h": ("2.01", "2.02", 50), "pconv": ("1.02", "0.88", 40),
}


def run(config: str, epochs: int, train_subset: int | None, out: Path) -> tuple[float, float]:
    """(test error %, seconds per epoch) of one CLI run."""
    cmd = [sys.executable, "train.py", "fit", "--config", f"configs/mnist/{config}.yaml",
           "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(out)]
    if train_subset:
        cmd += ["--data.train_subset", str(train_subset)]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    (out / f"{config}.log").write_text(result.stdout + result.stderr)
    match = re.search(r"test/acc\s+([0-9.]+)", result.stdout + result.stderr)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"{config} failed (exit {result.returncode}); see {out / f'{config}.log'}")
    return 100 * (1 - float(match.group(1))), seconds / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=[f"{m}_{a}" for m in PAPER for a in ("ep", "bptt")])
    parser.add_argument("--train_subset", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs_table1")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| config | paper test error (epochs) | ours: test error | epochs run | time/epoch |")
    print("|---|---|---|---|---|")
    for config in args.configs:
        model, algorithm = config.rsplit("_", 1)
        paper_ep, paper_bptt, paper_epochs = PAPER[model]
        error, per_epoch = run(config, args.epochs, args.train_subset, args.out)
        subset = f" on {args.train_subset} images" if args.train_subset else ""
        print(f"| {config} | {paper_ep if algorithm == 'ep' else paper_bptt} % ({paper_epochs}) | {error:.2f} % | "
              f"{args.epochs}{subset} | {per_epoch:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
