"""The CUDA path against the same computation on the CPU in float64 (skipped without a CUDA device).

Systems and data modules are built from the shipped configs through the CLI (``cli_main(..., run=False)``); training
steps run through a real Trainer. TF32 is switched off for these tests (cuDNN enables it for convolutions by
default, ~1e-3 relative), so every comparison is of float32 arithmetic against float64. Run on a GPU machine as part
of ``python benchmarks/device_check.py`` or directly: ``pytest -m cuda tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from device_check import cli_args, one_step_update, relative_error, step_overrides
from throughput import inner_network

from ep_lightning.cli import EPLightningCLI, cli_main

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

CONFIGS = {"P-1h": "p1h_ep", "EB-1h": "eb1h_ep", "P-conv": "pconv_ep"}
SMALL = ["data.init_args.train_subset=100", "data.init_args.test_subset=100", "data.init_args.eval_batch_size=50"]
#: CUDA float32 may be at most this many times farther from float64 than CPU float32 is (both float32; the factor
#: covers a different but equally valid order of operations: cuBLAS split-K reductions, fused kernels).
FACTOR = 10.0


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(config: str, overrides: list[str] = ()) -> EPLightningCLI:
    return cli_main(
        [
            "--config",
            str(ROOT / f"configs/mnist/{config}.yaml"),
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.accelerator",
            "cpu",
            *cli_args([*SMALL, *overrides]),
        ],
        run=False,
    )


def first_images(cli: EPLightningCLI, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    cli.datamodule.setup("fit")
    return cli.datamodule.train_set.images[:n], cli.datamodule.train_set.labels[:n]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_step_and_free_phase_on_cuda_match_float64_on_cpu(name: str) -> None:
    """From the same random state in [0, 1], one step (free and nudged) and 10 free-phase steps on CUDA equal the
    float64 CPU step. Tolerance 1e-5 absolute on states in [0, 1]: float32 round-off of a ≤ 1,600-term dot product is
    ≈ √1600 · 6e-8 ≈ 2.4e-6 and σ' ≤ 1 (sigmoid: a = 4, ×4); a wrong kernel or a dropped term is ≥ 1e-3."""
    cli = build(CONFIGS[name])
    net64 = copy.deepcopy(inner_network(cli.model)).double()
    net32 = inner_network(cli.model).cuda()
    x, labels = first_images(cli)
    x64, x32 = x.double(), x.cuda()
    target64 = net64.encode_target(labels, x64)
    torch.manual_seed(0)
    state64 = tuple(torch.rand_like(s) for s in net64.init_state(x64))
    state32 = tuple(s.float().cuda() for s in state64)
    with torch.no_grad():
        d64, d32 = net64.drive(x64), net32.drive(x32)
        for beta in (0.0, 0.5):
            t64 = target64 if beta else None
            t32 = target64.float().cuda() if beta else None
            out64, out32 = net64.step(state64, d64, beta, t64), net32.step(state32, d32, beta, t32)
            for a, b in zip(out32, out64):
                torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=1e-5)
        s64, s32 = state64, state32
        for _ in range(10):
            s64, s32 = net64.step(s64, d64), net32.step(s32, d32)
        for a, b in zip(s32, s64):
            # 10 steps of a contracting map: round-off does not grow beyond the one-step bound by more than the 10
            # steps it accumulates over.
            torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("config", "steps"),
    [("p1h_ep", (10, 4)), ("p1h_bptt", (10, 4)), ("eb1h_ep", (10, 4)), ("pconv_ep", (6, 3)), ("pconv_bptt", (6, 3))],
)
def test_training_step_on_cuda_matches_float64_on_cpu(config: str, steps: tuple[int, int]) -> None:
    """The EP update / BPTT gradient step (weights after − before one Trainer step) on CUDA against the float64 CPU
    step on the same batch and weights: CUDA float32 may be at most FACTOR times farther from float64 than CPU
    float32 is (FACTOR above)."""
    path = f"configs/mnist/{config}.yaml"
    overrides = [*SMALL, *step_overrides(path, *steps)]
    ref = one_step_update(path, "cpu", overrides, "64-true")
    cpu32 = one_step_update(path, "cpu", overrides, "32-true")
    cuda32 = one_step_update(path, "cuda", overrides, "32-true")
    assert max(float(u.abs().max()) for u in ref["update"].values()) > 0, "the step did not move the weights"
    cpu_err = relative_error(cpu32["update"], ref["update"])
    cuda_err = relative_error(cuda32["update"], ref["update"])
    assert cuda_err <= FACTOR * max(cpu_err, 1e-7), (cuda_err, cpu_err)


def test_compiled_relaxation_on_cuda_gives_the_eager_update() -> None:
    """The CUDA-graph-captured relaxation (``compile_relaxation``) gives the eager CUDA update on the same batch:
    ‖compiled − eager‖ ≤ FACTOR × ‖eager − float64‖ (both float32; only the order of round-off may differ)."""
    path = "configs/mnist/p1h_ep.yaml"
    overrides = [*SMALL, *step_overrides(path, 10, 4), "data.init_args.device_resident=true"]
    ref = one_step_update(path, "cpu", overrides, "64-true")
    eager = one_step_update(path, "cuda", overrides, "32-true")
    compiled = one_step_update(path, "cuda", [*overrides, "model.init_args.compile_relaxation=true"], "32-true")
    eager_err = relative_error(eager["update"], ref["update"])
    assert relative_error(compiled["update"], eager["update"]) <= FACTOR * max(eager_err, 1e-7)


def test_device_resident_data_lives_on_cuda_and_gives_the_host_fed_update() -> None:
    """``data.device_resident: true`` keeps the images on the GPU and trains on the same batches: the update equals
    the host-fed one (same values, same kernels; 1e-6 covers non-deterministic cuBLAS reductions)."""
    path = "configs/mnist/p1h_ep.yaml"
    overrides = [*SMALL, *step_overrides(path, 10, 4)]
    host = one_step_update(path, "cuda", [*overrides, "data.init_args.device_resident=false"], "32-true")
    resident = one_step_update(path, "cuda", [*overrides, "data.init_args.device_resident=true"], "32-true")
    for key, value in host["update"].items():
        torch.testing.assert_close(resident["update"][key], value, rtol=1e-6, atol=1e-8)
    cli = cli_main(
        [
            "--config",
            str(ROOT / path),
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.accelerator",
            "cuda",
            "--trainer.devices",
            "1",
            "--trainer.max_steps",
            "1",
            "--test_after_fit",
            "false",
            *cli_args([*overrides, "data.init_args.device_resident=true"]),
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.datamodule.train_set.images.device.type == "cuda"


def test_train_py_fits_and_tests_on_cuda(tmp_path: Path) -> None:
    """``train.py fit`` on CUDA trains P-1h for one epoch on 1,000 images and tests it: exit 0, test accuracy printed
    and above chance (one epoch of 50 batches reaches ≈ 80 % on the CPU; 30 % leaves room for any seed)."""
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "fit",
            "--config",
            "configs/mnist/p1h_ep.yaml",
            "--trainer.accelerator",
            "cuda",
            "--trainer.devices",
            "1",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.init_args.train_subset",
            "1000",
            "--data.init_args.test_subset",
            "1000",
            "--data.init_args.device_resident",
            "true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"test/acc\s*[│|]?\s*([0-9.]+)", result.stdout + result.stderr)
    assert match, (result.stdout + result.stderr)[-2000:]
    assert float(match.group(1)) > 0.3
