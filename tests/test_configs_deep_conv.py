"""The deep conv configs (configs/cifar10, configs/cifar100, configs/fmnist): their settings are Laborieux et al.'s
README run where they say so, and each one trains through the CLI (``train.py``'s ``cli_main``) with its own model
section on synthetic data of its input shape (``benchmarks/throughput.py``'s ``SyntheticImages``: the same config
with only the data module replaced), with short relaxations and a small batch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ep_lightning.cli import cli_main
from ep_lightning.models import ConvPrototypicalNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import synthetic_config

CONFIGS = sorted(p for folder in ("cifar10", "cifar100", "fmnist") for p in (ROOT / "configs" / folder).glob("*.yaml"))
SHORT = {"T": "3", "K": "2"}


def build_net(raw: dict[str, Any]) -> ConvPrototypicalNet:
    spec = raw["model"]["init_args"]["net"]
    assert spec["class_path"] == "ep_lightning.models.ConvPrototypicalNet"
    return ConvPrototypicalNet(**spec["init_args"])


def test_the_configs_exist() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in CONFIGS}
    assert {
        "cifar10/vgg_ep",
        "cifar10/vgg_bptt",
        "cifar100/vgg_ep",
        "fmnist/conv_ep",
        "fmnist/conv_bptt",
        "fmnist/p1h_ep",
    } <= names


@pytest.mark.parametrize("folder, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_configs_are_laborieux_et_al_readme_run(folder: str, classes: int) -> None:
    """channels 128 256 512 512, kernels 3, pools mmmm, strides 1, paddings 1 1 1 0, fc = the read-out, SGD lrs
    0.25 0.15 0.1 0.08 0.05, weight decay 3e-4, momentum 0.9, cosine decay (T_max 100, eta_min 1e-5), my_hard_sig,
    T1 250, T2 25, batch 128, beta 1 symmetric, cross-entropy with the softmax read-out learned at the nudged states."""
    raw = yaml.safe_load((ROOT / "configs" / folder / "vgg_ep.yaml").read_text())
    system = raw["model"]["init_args"]
    net = build_net(raw)
    assert net.init_state_shapes() == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 1, 1)]
    assert [tuple(g[0].shape) for g in net.parameter_groups()][-1] == (classes, 512)
    assert net.input_channels == 3 and net.input_size == 32 and net.num_classes == classes
    assert [g.kernel for g in net.geometry] == [3] * 4 and [g.stride for g in net.geometry] == [1] * 4
    assert [g.padding for g in net.geometry] == [1, 1, 1, 0] and [g.pool for g in net.geometry] == ["m"] * 4
    assert net.activation_name == "half_slope_hard_sigmoid"
    assert net.readout == "ce" and net.readout_gradient == "nudged"
    assert (system["T"], system["K"], system["beta"], system["nudging"]) == (250, 25, 1.0, "symmetric")
    assert system["lrs"] == [0.25, 0.15, 0.1, 0.08, 0.05] and system["weight_decays"] == [3.0e-4] * 5
    assert system["optimizer"]["class_path"] == "torch.optim.SGD"
    assert system["optimizer"]["init_args"]["momentum"] == 0.9
    scheduler = system["lr_scheduler"]
    assert scheduler["class_path"].endswith("CosineAnnealingLR")
    assert scheduler["init_args"] == {"T_max": 100, "eta_min": 1.0e-5}
    assert raw["trainer"]["max_epochs"] == 100  # their 120 epochs: 100 annealed, then 20 at 1e-5 (see the header)
    assert raw["data"]["init_args"]["batch_size"] == 128
    bptt = yaml.safe_load((ROOT / "configs" / "cifar10" / "vgg_bptt.yaml").read_text())
    if folder == "cifar10":
        assert bptt["model"]["init_args"]["algorithm"] == "bptt"
        assert bptt["model"]["init_args"]["T"] == 250 and bptt["model"]["init_args"]["K"] == 25
        assert build_net(bptt).init_state_shapes() == net.init_state_shapes()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_trains_two_batches_through_the_cli(config: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(config.read_text())
    assert set(raw) <= {"model", "data", "trainer"} and set(raw.get("trainer", {})) <= {"max_epochs"}
    system_args = raw["model"]["init_args"]
    overrides = [
        arg for key, value in SHORT.items() if key in system_args for arg in (f"--model.init_args.{key}", value)
    ]
    cli = cli_main(
        [
            "fit",
            "--config",
            synthetic_config(str(config), tmp_path),
            *overrides,
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.train_subset",
            "8",
            "--data.init_args.test_subset",
            "8",
            "--trainer.max_epochs",
            "1",
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
            "--threads",
            "1",
            "--test_after_fit",
            "false",
        ]
    )
    trainer = cli.trainer
    assert trainer.state.finished and trainer.global_step == 2
    assert [g.get("initial_lr", g["lr"]) for g in trainer.optimizers[0].param_groups] == system_args["lrs"]
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
