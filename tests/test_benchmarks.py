"""The benchmark scripts run end to end on tiny data and write what they document (never timed, never asserting a
speed): throughput.py, device_check.py --quick, table1.py with seeds and concurrent jobs, profile_step.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from device_check import step_overrides
from table1 import CHANCE_ACC, classify

TINY = ["data.init_args.train_subset=100", "data.init_args.eval_batch_size=20"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=ENV
    )


@pytest.mark.parametrize(("config", "steps"), [("p1h_ep", (3, 2)), ("p1h_bptt", (3, 2)), ("iep_1h", (2, 2))])
def test_throughput_prints_the_documented_json_keys(config: str, steps: tuple[int, int]) -> None:
    path = f"configs/mnist/{config}.yaml"
    result = run_script(
        [
            "benchmarks/throughput.py",
            "--config",
            path,
            "--batches",
            "3",
            "--warmup",
            "1",
            "--eval_batches",
            "1",
            "--set",
            *TINY,
            *step_overrides(path, *steps),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "train_samples_per_s",
        "train_ms_per_batch",
        "eval_samples_per_s",
        "epoch_s",
        "peak_mem_mb",
        "cpu",
        "threads",
        "torch",
    ):
        assert key in line, key
    assert line["train_samples_per_s"] > 0 and line["eval_samples_per_s"] > 0
    assert (line["T"], line["K"]) == steps
    assert line["timed_batches"] == 3
    assert line["malloc_tuning"] in (True, False)
    if config.startswith("p1h"):
        assert line["activation_mb"] > 0  # EquilibriumModule: the autograd-saved tensors of one step were measured


def test_throughput_on_synthetic_data_prints_conv_gflops() -> None:
    """``--synthetic`` times a config whose dataset is absent (here the Fashion-MNIST conv net) on seeded images of the
    network's input shape, and conv nets get their convolutions' GFLOP/s: the count per training sample is the drive
    plus (T + 2K) steps of forward and feedback convolutions (symmetric nudging: two nudged phases)."""
    path = "configs/fmnist/conv_ep.yaml"
    result = run_script(
        [
            "benchmarks/throughput.py",
            "--config",
            path,
            "--synthetic",
            "--epoch_samples",
            "1000",
            "--batches",
            "2",
            "--warmup",
            "1",
            "--eval_batches",
            "1",
            "--set",
            "data.init_args.batch_size=8",
            "data.init_args.train_subset=32",
            "data.init_args.test_subset=16",
            "data.init_args.eval_batch_size=8",
            *step_overrides(path, 3, 2),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["synthetic_data"] and line["epoch_samples"] == 1000
    # conv2 16→32 on 12×12 and conv3 32→32 on 6×6, 3×3 kernels; conv1 1→16 5×5 on 24×24 once (the drive)
    step = 2 * (32 * 16 * 9 * 12**2 + 32 * 32 * 9 * 6**2)
    assert line["relaxation_gflop_per_sample"] == round(2 * (16 * 25 * 24**2 + (3 + 2 * 2) * step) / 1e9, 4)
    assert line["train_gflops"] > 0 and line["eval_gflops"] > 0


def test_conv_efficiency_prints_both_rates() -> None:
    result = run_script(
        [
            "benchmarks/conv_efficiency.py",
            "--config",
            "configs/fmnist/conv_ep.yaml",
            "--batch",
            "4",
            "--steps",
            "2",
            "--repeats",
            "1",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert [layer["layer"] for layer in line["layers"]] == [2, 3]
    assert line["plain_conv_gflops"] > 0 and line["relaxation_gflops"] > 0
    assert 0 < line["relaxation_share_of_plain"] and line["cpu"]


def test_device_check_quick_runs_every_part_and_writes_json_and_markdown(tmp_path: Path) -> None:
    """``--quick`` on the CPU: every part runs (CUDA tests skipped without CUDA, compilation where a C++ compiler
    exists) and lands in one JSON and one Markdown file; no part fails."""
    result = run_script(
        ["benchmarks/device_check.py", "--quick", "--device", "cpu", "--budget", "150", "--out", str(tmp_path)],
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["machine"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert report["cuda_tests"]["status"] == "skipped", report["cuda_tests"]
    for part in ("throughput", "parity", "train"):
        assert report[part]["status"] == "ok", (part, report[part])
    rows = report["throughput"]["records"]
    assert {r["system"] for r in rows if r["status"] == "ok"} == {
        "P-1h",
        "EB-1h",
        "P-conv",
        "IEP-1h",
        "CIFAR-10 VGG",
    }, rows
    (cifar,) = [r for r in rows if r["system"] == "CIFAR-10 VGG"]
    assert cifar["synthetic_data"] and cifar["epoch_samples"] == 50_000 and cifar["train_gflops"] > 0
    assert {(r["compile"], r["resident"]) for r in rows if r["system"] == "P-1h"} == {
        (False, True),
        (True, True),
        (False, False),
        (True, False),
    }
    assert all(r["status"] in ("ok", "skipped") for r in rows), rows
    for r in report["parity"]["records"]:
        assert r["status"] == "ok" or (r["status"] == "skipped" and r["reason"]), r
    epochs = [r for r in report["train"]["records"] if "epoch" in r]
    assert epochs and all(0 <= r["test_error_percent"] <= 100 for r in epochs)
    text = (tmp_path / "device_check.md").read_text()
    assert "## Throughput" in text and "## P-conv EP, budgeted training" in text


def test_table1_runs_seeds_concurrently_and_reports_mean_std_and_divergence(tmp_path: Path) -> None:
    """Two seeds of P-1h as two concurrent train.py runs on 300 images: both finish, each has a test error, the
    summary has mean ± std over the two and counts diverged runs."""
    result = run_script(
        [
            "benchmarks/table1.py",
            "--configs",
            "p1h_ep",
            "--seeds",
            "0",
            "1",
            "--jobs",
            "2",
            "--train_subset",
            "300",
            "--test_subset",
            "100",
            "--accelerator",
            "cpu",
            "--timeout",
            "300",
            "--set",
            "model.init_args.T=10",
            "model.init_args.K=4",
            "--out",
            str(tmp_path),
        ],
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "table1.json").read_text())
    runs = data["runs"]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert all(r["returncode"] == 0 and r["test_error"] is not None for r in runs), runs
    summary = data["summary"]["p1h_ep"]
    assert summary["runs"] == 2 and summary["diverged"] == sum(r["diverged"] for r in runs)
    trained = [r["test_error"] for r in runs if not r["diverged"]]
    if len(trained) == 2:
        assert summary["test_error_mean"] == pytest.approx(sum(trained) / 2, abs=0.01)
        assert summary["test_error_std"] is not None
    assert data["summary"]["_all"]["aggregate_samples_per_s"] > 0
    assert "| p1h_ep |" in (tmp_path / "table1.md").read_text()


@pytest.mark.parametrize(
    ("returncode", "output", "diverged", "reason"),
    [
        (0, "│ test/acc │ 0.9512 │", False, ""),
        (0, f"test/acc {CHANCE_ACC - 0.05:.4f}", True, "chance accuracy"),
        (1, "error: non-finite values at epoch 0, step 12: free s_1 …", True, "divergence error"),
        (2, "error: model.T=0 is invalid", True, "exit 2"),
        (None, "", True, "killed"),
        (0, "no metrics printed", True, "no test accuracy"),
    ],
)
def test_table1_classifies_diverged_runs(returncode: int | None, output: str, diverged: bool, reason: str) -> None:
    _, got_diverged, got_reason = classify(returncode, output)
    assert got_diverged == diverged
    assert got_reason.startswith(reason)


def test_profile_step_prints_the_breakdown() -> None:
    result = run_script(
        [
            "benchmarks/profile_step.py",
            "--batches",
            "4",
            "--warmup",
            "2",
            "--set",
            *TINY,
            "model.init_args.T=3",
            "model.init_args.K=2",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["whole_batch_ms"] > 0
    assert {"training_step (total)", "relaxation phases", "manual_backward"} <= set(line["lightning_ms"])
    assert line["bare_loop_ms"]["total"] > 0 and line["relaxation"]["wall_ms"] > 0
