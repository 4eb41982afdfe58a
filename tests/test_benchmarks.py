"""The benchmark script runs end to end on every kind of training module and prints its JSON line (never timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.init_args.train_subset=100", "data.init_args.eval_batch_size=20"]


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        ("p1h_ep", ["model.init_args.T=3", "model.init_args.K=2"]),
        ("p1h_bptt", ["model.init_args.T=3", "model.init_args.K=2"]),
        ("iep_1h", ["model.init_args.T_minus=2", "model.init_args.T_plus=2"]),
    ],
)
def test_throughput_prints_the_documented_json_keys(config: str, steps: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--config", f"configs/mnist/{config}.yaml", "--batches", "3",
         "--warmup", "1", "--eval_batches", "1", "--set", *TINY, *steps],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("train_samples_per_s", "eval_samples_per_s", "epoch_s", "peak_mem_mb", "cpu", "threads", "torch"):
        assert key in line, key
    assert line["train_samples_per_s"] > 0 and line["eval_samples_per_s"] > 0
    assert line["T"] == int(steps[0].split("=")[1]) and line["K"] == int(steps[1].split("=")[1])
    assert line["malloc_tuning"] in (True, False)
    if config.startswith("p1h"):
        assert line["activation_mb"] > 0  # EquilibriumModule: the autograd-saved tensors of one step were measured
