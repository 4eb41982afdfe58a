"""``ep_lightning.checkpoints`` piece by piece: atomic writes under injected write failures, the ``last`` lookup
that skips unreadable files, the signature, the list of settings that differ from a checkpoint, and the merge of
configured optimizer settings into a restored optimizer state.

The user paths (``train.py`` on a real full or read-only disk) are in tests/test_user_paths.py.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch

from ep_lightning import checkpoints
from ep_lightning.checkpoints import (
    _merge_groups,
    atomic_save,
    check_signature,
    hpc_checkpoint,
    latest_checkpoint,
    run_folder_of,
    settings_differences,
    signature,
)
from ep_lightning.errors import CheckpointWriteError, ConfigError


# --- atomic writes ---------------------------------------------------------------------------------------------
class FullDisk:
    """``os.fdopen`` replacement whose files raise ENOSPC once ``budget`` bytes were written (a fault injected at the
    Python level: what a full disk does to ``write``)."""

    def __init__(self, budget: int, where: str = "write") -> None:
        self.budget, self.where = budget, where
        self.original = os.fdopen

    def __call__(self, fd: int, mode: str = "r", *args, **kwargs):
        handle = self.original(fd, mode, *args, **kwargs)
        injector = self

        class Limited:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data) -> int:
                if injector.where == "write" and len(data) > injector.budget:
                    handle.write(bytes(data)[: injector.budget])  # a partial write, as on a real disk
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return handle.write(data)

            def flush(self) -> None:
                handle.flush()

            def fileno(self) -> int:
                if injector.where == "fsync":
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                return handle.fileno()

        return Limited()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated ENOSPC (write) / EIO (fsync): one CheckpointWriteError naming the path, the old file byte-for-byte
    unchanged, no temporary file left in the folder."""
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoints.os, "fdopen", FullDisk(budget=100, where=where))
    with pytest.raises(CheckpointWriteError) as info:
        atomic_save({"step": 2, "w": torch.arange(5000.0)}, path)
    message = str(info.value)
    assert str(path) in message and "intact" in message and "\n" not in message, message
    assert info.value.errno == (errno.ENOSPC if where == "write" else errno.EIO)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_atomic_save_replaces_the_file_and_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.ckpt"
    atomic_save({"a": torch.ones(3)}, path)
    path.chmod(0o640)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]


def test_unwritable_folder_is_one_checkpoint_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match=str(blocker)):
        atomic_save({"a": 1}, blocker / "checkpoints" / "last.ckpt")


# --- the `last` lookup -----------------------------------------------------------------------------------------
def _touch_checkpoint(path: Path, step: int, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_latest_checkpoint_takes_the_highest_version_and_skips_unreadable_files(tmp_path: Path) -> None:
    _touch_checkpoint(tmp_path / "version_0/checkpoints/last.ckpt", 10, age=100)
    good = _touch_checkpoint(tmp_path / "version_2/checkpoints/epoch=0-step=5.ckpt", 5, age=50)
    truncated = _touch_checkpoint(tmp_path / "version_2/checkpoints/last.ckpt", 7, age=10)
    truncated.write_bytes(truncated.read_bytes()[:100])
    (tmp_path / "version_3").mkdir()  # a version without checkpoints (a failed start)
    (tmp_path / "version_x").mkdir()
    notices: list[str] = []
    assert latest_checkpoint(tmp_path, notices.append) == (2, good)
    assert len(notices) == 1 and str(truncated) in notices[0] and "not a readable checkpoint" in notices[0]


def test_latest_checkpoint_prefers_last_on_equal_times_and_reads_flat_folders(tmp_path: Path) -> None:
    a = _touch_checkpoint(tmp_path / "checkpoints/epoch=1-step=4.ckpt", 4, age=5)
    b = _touch_checkpoint(tmp_path / "checkpoints/last.ckpt", 4, age=5)
    os.utime(b, (a.stat().st_atime, a.stat().st_mtime))
    assert latest_checkpoint(tmp_path, print, versions=False) == (None, b)
    assert latest_checkpoint(tmp_path / "nothing", print) is None


def test_hpc_checkpoint_is_the_highest_number(tmp_path: Path) -> None:
    assert hpc_checkpoint(tmp_path) is None
    for n in (1, 2, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_x.ckpt").write_bytes(b"")
    assert hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_10.ckpt"


def test_run_folder_of_a_checkpoint() -> None:
    assert run_folder_of(Path("runs/p1h/version_3/checkpoints/last.ckpt")) == Path("runs/p1h/version_3")
    assert run_folder_of(Path("/tmp/x.ckpt")) == Path("/tmp")


# --- signature and settings ------------------------------------------------------------------------------------
MODEL = {
    "class_path": "ep_lightning.systems.EquilibriumModule",
    "init_args": {
        "algorithm": "ep",
        "T": 30,
        "eval_steps": None,
        "lrs": [0.1, 0.05],
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0, "momentum": 0.9}},
        "net": {"class_path": "ep_lightning.models.PrototypicalNet", "init_args": {"layers": [784, 16, 10]}},
    },
}


def test_signature_covers_the_network_not_the_optimizer() -> None:
    sig = signature(MODEL)
    assert sig == {
        "module class": "ep_lightning.systems.EquilibriumModule",
        "algorithm": "ep",
        "net class": "ep_lightning.models.PrototypicalNet",
        "net.layers": [784, 16, 10],
    }
    # an older checkpoint that also signed its optimizer still loads under another optimizer
    old = {checkpoints.SIGNATURE_KEY: {**sig, "optimizer class": "torch.optim.Adam", "optimizer.lr": 0.1}}
    check_signature("old.ckpt", old, sig)
    with pytest.raises(ConfigError, match=r"net.layers: checkpoint \[784, 16, 10\], config \[784, 32, 10\]"):
        check_signature("old.ckpt", old, {**sig, "net.layers": [784, 32, 10]})


def test_settings_differences_name_each_changed_setting() -> None:
    saved = {
        "hyper_parameters": {
            "_class_path": "x",
            "T": 30,
            "eval_steps": None,
            "lrs": [0.1, 0.05],
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0, "momentum": 0.9}},
        },
        "datamodule_hyper_parameters": {"batch_size": 20, "test_subset": None},
    }
    assert settings_differences(saved, MODEL, {"init_args": {"batch_size": 20}}) == []
    changed = {**MODEL, "init_args": {**MODEL["init_args"], "eval_steps": 1, "lrs": [1.0, 1.0]}}
    assert settings_differences(saved, changed, {"init_args": {"batch_size": 20, "test_subset": 100}}) == [
        "model.eval_steps 1 (checkpoint None)",
        "model.lrs [1.0, 1.0] (checkpoint [0.1, 0.05])",
        "data.test_subset 100 (checkpoint None)",
    ]


def test_merge_groups_applies_configured_settings_and_keeps_the_schedule_progress() -> None:
    """Saved group: initial lr 0.1 decayed to 0.025 by a schedule, momentum 0.9. Configured: initial lr 0.2,
    momentum 0.5. Merged: lr 0.025 · 0.2/0.1 = 0.05, momentum 0.5; an unchanged group keeps its exact value."""
    saved = [
        {"lr": 0.025, "initial_lr": 0.1, "momentum": 0.9, "params": [0]},
        {"lr": 0.0125, "initial_lr": 0.05, "momentum": 0.9, "params": [1]},
    ]
    fresh = [
        {"lr": 0.2, "initial_lr": 0.2, "momentum": 0.5, "params": [0]},
        {"lr": 0.05, "initial_lr": 0.05, "momentum": 0.5, "params": [1]},
    ]
    ratios = _merge_groups(saved, fresh)
    assert ratios == [2.0, 1.0]
    assert saved[0] == {"lr": 0.05, "initial_lr": 0.2, "momentum": 0.5, "params": [0]}
    assert saved[1]["lr"] == 0.0125 and saved[1]["momentum"] == 0.5


# --- configured optimizer settings on resume (a real Trainer restore) ------------------------------------------
class TinyModule(__import__("lightning").LightningModule):
    """One linear layer; ``optimizer`` ('sgd' with momentum or 'adam') and ``lr`` are its hyperparameters, a StepLR
    halves the rate every epoch."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def _fit(tmp: Path, module, epochs: int, ckpt: Path | None = None, reports: list[str] | None = None):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    callbacks = [checkpoints.ConfiguredOptimizerSettings(report=(reports if reports is not None else []).append)]
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp),
    )
    data = DataLoader(TensorDataset(torch.rand(8, 3, generator=torch.Generator().manual_seed(0))), batch_size=4)
    trainer.fit(module, data, ckpt_path=str(ckpt) if ckpt else None)
    return trainer


def test_resume_applies_a_changed_learning_rate_and_keeps_the_schedule(tmp_path: Path) -> None:
    """Trained 2 epochs at lr0 0.1 (StepLR: now 0.025), resumed with lr0 0.4: the rate continues as 0.025 · 4 = 0.1
    and halves at the next epoch end (0.05); the momentum buffers are the checkpoint's."""
    trainer = _fit(tmp_path, TinyModule(lr=0.1), epochs=2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.025)
    reports: list[str] = []
    resumed = _fit(tmp_path, TinyModule(lr=0.4), epochs=3, ckpt=tmp_path / "two.ckpt", reports=reports)
    group = resumed.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(0.4 * 0.5**3) and group["initial_lr"] == 0.4
    assert resumed.lr_scheduler_configs[0].scheduler.base_lrs == [0.4]
    assert reports == [], "same optimizer class: nothing starts afresh"


def test_resume_with_another_optimizer_class_starts_its_state_afresh(tmp_path: Path) -> None:
    """SGD with momentum → Adam: Lightning alone would load SGD's state into Adam and fail; here Adam starts with
    its own fresh state (its step count is the resumed epoch's 2 steps) and the change is reported."""
    trainer = _fit(tmp_path, TinyModule("sgd"), epochs=1)
    trainer.save_checkpoint(tmp_path / "sgd.ckpt")
    reports: list[str] = []
    resumed = _fit(tmp_path, TinyModule("adam", lr=0.01), epochs=2, ckpt=tmp_path / "sgd.ckpt", reports=reports)
    optimizer = resumed.optimizers[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert [float(s["step"]) for s in optimizer.state.values()] == [2.0, 2.0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5), "the new schedule ran one epoch"
    assert reports == ["the configuration changes the optimization: optimizer 0, lr scheduler 0 start afresh"]
