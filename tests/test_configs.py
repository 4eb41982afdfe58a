"""Every config in configs/mnist/*.yaml parses (``--print_config``) and trains two batches through the CLI.

Parametrized over the glob, so configs added later are covered automatically. Relaxation lengths are overridden
small (T, K) to keep the suite fast: the configs' own T (up to a few hundred steps) is what `--print_config` checks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from ep_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "mnist").glob("*.yaml"))
#: Overrides of the system's relaxation lengths, applied only to keys the config sets (other systems may differ).
SHORT = {"T": "3", "K": "2", "eval_steps": "3", "bptt_steps": "2"}


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    for arch in ("p1h", "p2h", "p3h", "pconv"):
        assert {f"{arch}_ep", f"{arch}_bptt"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_print_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The config parses and every class in it instantiates-ready: the printed config names the same classes."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == raw["model"]["class_path"]
    assert printed["model"]["init_args"]["net"]["class_path"] == raw["model"]["init_args"]["net"]["class_path"]
    for key, value in raw["model"]["init_args"].items():
        if key != "net":
            assert _contains(printed["model"]["init_args"][key], value), key


def _contains(printed: object, raw: object) -> bool:
    """``printed`` equals ``raw``, except that a nested class (optimizer, scheduler) may add its defaults."""
    if isinstance(raw, dict) and isinstance(printed, dict):
        return all(k in printed and _contains(printed[k], v) for k, v in raw.items())
    return printed == raw


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_trains_two_batches(config: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(config.read_text())
    system_args = raw["model"]["init_args"]
    overrides = [
        arg for key, value in SHORT.items() if key in system_args for arg in (f"--model.init_args.{key}", value)
    ]
    cli = cli_main(
        [
            "fit",
            "--config",
            str(config),
            *overrides,
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "2",  # "1" would parse as the float 1.0 = all batches
            "--trainer.limit_test_batches",
            "2",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.data_dir",
            str(ROOT / "data"),
            "--data.train_subset",
            "40",
            "--data.test_subset",
            "40",
            "--data.eval_batch_size",
            "40",
            "--threads",
            "1",
            "--test_after_fit",
            "false",
        ]
    )
    trainer = cli.trainer
    assert trainer.state.finished
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    assert trainer.global_step == 2  # two optimizer steps (manual optimization counts optimizer.step calls)
    if system_args.get("lrs") is not None:
        # a scheduler has already stepped once (epoch end); `initial_lr` is the configured value it started from
        assert [g.get("initial_lr", g["lr"]) for g in trainer.optimizers[0].param_groups] == system_args["lrs"]
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    (results,) = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert 0.0 <= results["test/acc"] <= 1.0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_model_configs_hold_only_what_differs_from_the_defaults(config: Path) -> None:
    """Logger and checkpointing live in configs/defaults.yaml; a model config names neither, and its run is named
    after the file (runs/<stem>)."""
    raw = yaml.safe_load(config.read_text())
    assert set(raw) <= {"model", "data", "trainer"}, sorted(raw)
    assert "logger" not in raw.get("trainer", {})
    assert set(raw.get("trainer", {})) <= {"max_epochs"}
    assert "class_path" not in raw.get("data", {}), "the data module comes from configs/defaults.yaml"


def test_defaults_load_from_any_working_directory(tmp_path: Path) -> None:
    """`train.py` run from another folder still reads configs/defaults.yaml (found relative to the repository) and
    names the run after the config file."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            str(ROOT / "configs/mnist/p1h_ep.yaml"),
            "--print_config",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    logger = printed["trainer"]["logger"]
    assert logger["class_path"].endswith("TensorBoardLogger")
    assert logger["init_args"]["save_dir"] == "runs" and logger["init_args"]["default_hp_metric"] is False
    assert logger["init_args"]["name"] == "p1h_ep"
    classes = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in classes
