"""The data modules as a user runs them: ``train.py fit`` in a subprocess with the shipped P-1h config (logger,
progress bar, checkpointing and monitors on) on Fashion-MNIST and on a small official-format CIFAR-10 folder, and a
2-process DDP run SIGTERMed mid-epoch and resumed with ``--ckpt_path last`` that ends with the weights of the
uninterrupted 2-process run. The process helpers (session, kill timeout, pty) are tests/test_user_paths.py's."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import test_user_paths as U
import torch
import yaml
from cifar_files import write_cifar

from ep_lightning.data import SPLIT_FILES, load_idx

TESTS = Path(__file__).resolve().parent
P1H = str(U.CONFIGS / "mnist" / "p1h_ep.yaml")
pytestmark = pytest.mark.user_paths


@pytest.fixture(autouse=True)
def _tests_on_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.py subprocesses also import the test callbacks (resume_helpers, data_helpers)."""
    base = U._env
    tests_path = {"PYTHONPATH": os.pathsep.join([str(U.REPO), str(TESTS)])}
    monkeypatch.setattr(U, "_env", lambda extra=None: {**base(extra), **tests_path})


def _recorded_labels(path: Path) -> list[list[int]]:
    """Labels of each training batch written by resume_helpers.RecordBatches."""
    return [yaml.safe_load(line.split(" ", 3)[3]) for line in path.read_text().splitlines()]


def test_fashion_mnist_fit_with_the_p1h_config(tmp_path: Path) -> None:
    """P-1h on Fashion-MNIST, tqdm bar on (a terminal): trains, tests, checkpoints; the batches are the shipped
    Fashion-MNIST files' labels in the run's order (randperm seeded with the run seed 0 + epoch 0)."""
    run = U.train_in_terminal(
        [
            "fit",
            "--config",
            P1H,
            "--data.class_path",
            "ep_lightning.data.FashionMNISTDataModule",
            *U.common(tmp_path, batches=3),
            "--trainer.callbacks+=resume_helpers.RecordBatches",
            "--trainer.callbacks.path",
            str(tmp_path / "batches.txt"),
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert "Epoch 0: 100%" in run.stdout
    assert re.search(r"test accuracy \d+\.\d\d % \(error \d+\.\d\d %\)", run.stdout), run.stdout[-2000:]
    folder = tmp_path / "runs" / "p1h_ep" / "version_0"
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["data"]["class_path"] == "ep_lightning.data.FashionMNISTDataModule"
    # no `name` option: switching the class path from MNIST's cannot carry `name: MNIST` over (it once did)
    assert "name" not in config["data"]["init_args"] and config["data"]["init_args"]["verify_checksums"]
    labels = load_idx(U.REPO / "data" / "FashionMNIST" / "raw", SPLIT_FILES["train"][1], verify=False).long()
    order = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))
    expected = [labels[order[20 * b : 20 * (b + 1)]].tolist() for b in range(3)]
    assert _recorded_labels(tmp_path / "batches.txt") == expected


def test_ddp_run_sigtermed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    """2 gloo processes, P-1h, 2 epochs × 40 batches of 20 per rank. SIGTERM reaches the launching process (rank
    0) at the end of step 25 (epoch 0, batch 25 of 40); the ranks stop together and save last.ckpt; ``--ckpt_path
    last`` finishes epoch 0 from its 26th batch and runs epoch 1. The final weights equal those of the
    uninterrupted 2-process run bit for bit (same global batches, same all-reduced arithmetic), and Lightning does
    not warn that the loader is not resumable."""

    def ddp_args(root: Path) -> list[str]:
        return [
            "fit",
            "--config",
            P1H,
            "--config",
            str(U.CONFIGS / "trainer" / "ddp.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            *U.common(root, batches=40),
            "--trainer.max_epochs",
            "2",
            "--test_after_fit",
            "false",
        ]

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = U.train(ddp_args(reference_dir), reference_dir)
    assert reference.returncode == 0, reference.stderr[-3000:]

    args = ddp_args(tmp_path)
    stopped = U.train(
        [*args, "--trainer.callbacks+=data_helpers.SignalAt", "--trainer.callbacks.at_step", "25"], tmp_path
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    match = re.search(
        r"interrupted by SIGTERM at epoch 0, global step (\d+): checkpoint saved to (\S+);", stopped.stderr
    )
    assert match and int(match.group(1)) in (25, 26), stopped.stderr[-3000:]
    last = tmp_path / "runs" / "p1h_ep" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["loops"]["fit_loop"]["state_dict"]
    loader_state = state["combined_loader"][0]
    assert loader_state["num_replicas"] == 2 and loader_state["samples_done"] == 20 * int(match.group(1))

    resumed = U.train([*args, "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr
    assert "not resumable" not in resumed.stdout + resumed.stderr
    expected = U.final_weights(reference_dir / "runs" / "p1h_ep" / "version_0" / "checkpoints" / "last.ckpt")
    got = U.final_weights(last)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 80
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("config, kind", [("cifar10/vgg_ep", "cifar10"), ("cifar100/vgg_ep", "cifar100")])
def test_shipped_cifar_config_trains_and_tests_on_official_format_files(config: str, kind: str, tmp_path: Path) -> None:
    """The shipped CIFAR config (Laborieux et al.'s VGG, symmetric nudging, CE read-out, SGD + momentum + cosine) as
    a user runs it: ``train.py fit`` on a folder in the official python-pickle format (``verify_checksums: false``
    for its size), 2 batches of 4 with T 3 / K 2, logger, progress bar, checkpointing and monitors on, then the test."""
    write_cifar(tmp_path / "data", kind=kind, train=8, test=8)
    run = U.train_in_terminal(
        [
            "fit",
            "--config",
            str(U.CONFIGS / f"{config}.yaml"),
            *U.common(tmp_path, batches=2),
            "--data.init_args.data_dir",
            str(tmp_path / "data"),
            "--data.init_args.verify_checksums",
            "false",
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.test_subset",
            "8",
            "--model.init_args.T",
            "3",
            "--model.init_args.K",
            "2",
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert re.search(r"test accuracy \d+\.\d\d % \(error \d+\.\d\d %\)", run.stdout), run.stdout[-2000:]
    name = config.split("/")[1]
    checkpoint = torch.load(tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["state_dict"]["net.fc.weight"].shape == (10 if kind == "cifar10" else 100, 512)
    data = checkpoint["datamodule_hyper_parameters"]
    assert data["augment"] is True and tuple(data["mean"]) == (0.4914, 0.4822, 0.4465)
