"""The checkpoint format in one place: its keys, the signature that refuses a foreign checkpoint, reading, atomic
writing, the ``last`` lookup across a config's version folders, what a resumed run takes from the command line, and
where evaluations of a checkpoint write.

A checkpoint is Lightning's dict (``state_dict``, ``loops``, ``optimizer_states``, ``lr_schedulers``,
``hyper_parameters``, ``datamodule_hyper_parameters``, …) plus the entries named by the ``*_KEY`` constants below.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.optim.lr_scheduler import LRScheduler

from ep_lightning.errors import CheckpointWriteError, ConfigError

# --- keys ------------------------------------------------------------------------------------------------------
#: The config signature (module class, algorithm, sub-network classes and arguments): see :func:`signature`.
SIGNATURE_KEY = "ep_lightning_signature"
#: The run folder (logger ``log_dir``) that wrote the checkpoint, so a resumed run continues writing there.
RUN_FOLDER_KEY = "ep_lightning_run_folder"
#: Constructor arguments of Initialized EP's initializer (``FeedforwardInitializer.from_checkpoint``).
INITIALIZER_CONFIG_KEY = "initializer_config"
#: State of the β-sign generator of random-sign nudging (exact resume).
SIGN_GENERATOR_KEY = "beta_sign_generator"
#: The warm-start table of persistent free-phase states (exact resume).
WARM_START_KEY = "ep_warm_start_states"
#: The training epoch's running sums (``metrics.EpochMeans``), so a run resumed mid-epoch logs the epoch's true means.
EPOCH_SUMS_KEY = "ep_lightning_epoch_sums"

#: Lightning's SLURM requeue checkpoints: ``<default_root_dir>/hpc_ckpt_<N>.ckpt``, the highest N is resumed.
HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
#: ``ckpt_path`` values Lightning resolves itself.
SPECIAL_PATHS = ("last", "best", "hpc", "registry")


# --- signature -------------------------------------------------------------------------------------------------
#: Sub-objects of a system config that are settings, not architecture: a checkpoint loads under other values.
NON_ARCHITECTURE_ARGS = frozenset({"optimizer", "lr_scheduler"})


def signature(model_config: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint must share with the config that loads it: the LightningModule class, its ``algorithm``,
    and the class and arguments of every sub-network it is given (``net``, ``initializer``, …)."""
    if not model_config:
        return {}
    init_args = model_config.get("init_args") or {}
    result: dict[str, Any] = {"module class": model_config.get("class_path")}
    if "algorithm" in init_args:
        result["algorithm"] = init_args["algorithm"]
    for key, value in sorted(init_args.items()):
        if isinstance(value, dict) and "class_path" in value and key not in NON_ARCHITECTURE_ARGS:
            result[f"{key} class"] = value["class_path"]
            for arg, arg_value in sorted((value.get("init_args") or {}).items()):
                result[f"{key}.{arg}"] = arg_value
    return result


def check_signature(path: str | Path, checkpoint: dict[str, Any], expected: dict[str, Any]) -> None:
    """ConfigError naming the checkpoint and every differing field if it was written for another model class,
    algorithm or network. Checkpoints without a signature are compared on the LightningModule's class_path and
    algorithm (in their hyperparameters)."""
    saved = checkpoint.get(SIGNATURE_KEY)
    if saved is None:
        hparams = checkpoint.get("hyper_parameters") or {}
        saved = {"module class": hparams.get("_class_path")}
        if "algorithm" in hparams:
            saved["algorithm"] = hparams["algorithm"]
        expected = {k: v for k, v in expected.items() if k in saved and saved[k] is not None}
    saved, expected = _architecture(saved), _architecture(expected)
    keys = [k for k in dict.fromkeys([*saved, *expected]) if not same_value(saved.get(k), expected.get(k))]
    if keys:
        diffs = "; ".join(f"{k}: checkpoint {_show(saved.get(k))}, config {_show(expected.get(k))}" for k in keys)
        raise ConfigError(
            f"checkpoint {path} was written for another model ({diffs}); use the config it was trained with "
            f"(its run folder holds config.yaml)"
        )


def _architecture(signature: dict[str, Any]) -> dict[str, Any]:
    """The signature without settings (older checkpoints also signed their optimizer and scheduler)."""
    return {k: v for k, v in signature.items() if re.split(r"[ .]", k, maxsplit=1)[0] not in NON_ARCHITECTURE_ARGS}


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def _normal(value: Any) -> Any:
    """Compare lists/tuples and ints/floats by value (YAML may give 1 where the checkpoint holds 1.0)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if callable(value) and hasattr(value, "__qualname__"):  # a default factory (e.g. ``sgd``), saved by import path
        return f"{value.__module__}.{value.__qualname__}"
    return value


def same_value(a: Any, b: Any) -> bool:
    return _normal(a) == _normal(b)


class CheckpointSignature(L.Callback):
    """Writes the run's signature and its run folder into every checkpoint: a later ``--ckpt_path`` with another
    config is refused by name instead of loading weights into the wrong model, and a resumed run knows its folder."""

    def __init__(self, signature: dict[str, Any]) -> None:
        self.signature = signature

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[SIGNATURE_KEY] = self.signature
        if trainer.loggers:
            checkpoint[RUN_FOLDER_KEY] = str(trainer.log_dir)


# --- reading ---------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, field: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors memory-mapped, on the CPU), or a ConfigError naming ``field`` if the file
    is missing, truncated or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{field}={str(path)!r}: no such file; give the path of a .ckpt file written by a run "
            f"(e.g. runs/<name>/version_<N>/checkpoints/last.ckpt) or `--{field} last`"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means an unusable file
        raise ConfigError(
            f"{field}={str(path)!r} is truncated or not a checkpoint ({type(err).__name__}); use another file, "
            f"e.g. an earlier checkpoint of the same run"
        ) from None


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as a checkpoint (one short phrase), or None if it can."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file cannot be resumed from
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}" if str(err) else type(err).__name__
    return None


# --- the `last` lookup (Lightning looks only in the new run's folder; runs live in version folders) -------------
def latest_checkpoint(
    root: Path, notice: Callable[[str], None], versions: bool = True
) -> tuple[int | None, Path] | None:
    """(N, file): the newest readable checkpoint in ``<root>/version_<N>/checkpoints/`` of the highest N that has
    one (``versions=False``: in ``<root>/checkpoints/``, N None). Newest is by modification time, ``last.ckpt``
    first on a tie (as Lightning's own ``last``). Unreadable files (truncated, not a checkpoint) are skipped with a
    one-line ``notice`` each."""
    folders: list[tuple[int | None, Path]] = [(None, root)]
    if versions:
        numbered = [(f.name.removeprefix("version_"), f) for f in root.glob("version_*")]
        folders = sorted(((int(n), f) for n, f in numbered if n.isdigit()), reverse=True)
    for version, folder in folders:
        files = sorted(
            (folder / "checkpoints").glob("*.ckpt"),
            key=lambda f: (f.stat().st_mtime, f.name == "last.ckpt"),
            reverse=True,
        )
        for path in files:
            reason = unreadable_reason(path)
            if reason is None:
                return version, path
            notice(f"skipping {path}: not a readable checkpoint ({reason})")
    return None


def hpc_checkpoint(folder: Path) -> Path | None:
    """Lightning's SLURM requeue checkpoint in ``folder`` (the highest ``hpc_ckpt_<N>.ckpt``), if any."""
    found = [(int(m.group(1)), p) for p in folder.glob("hpc_ckpt_*.ckpt") if (m := HPC_PATTERN.fullmatch(p.name))]
    return max(found)[1] if found else None


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` of the ModelCheckpoint that writes one (else of the first; else default_root_dir/last.ckpt),
    the newest file where ``--ckpt_path last`` looks.

    The ModelCheckpoint is told that this file is its last checkpoint (its ``last_model_path`` is saved in the
    checkpoint), so the continued run overwrites it instead of writing ``last-v1.ckpt`` next to it."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    for callback in sorted(callbacks, key=lambda c: not c.save_last):  # the one that writes last.ckpt first
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        callback.last_model_path = str(path)
        return path
    return Path(trainer.default_root_dir) / "last.ckpt"


def catch_up_epoch_schedulers(module: L.LightningModule) -> None:
    """Step every per-epoch scheduler until ``scheduler.last_epoch == current_epoch``.

    A module that steps its schedulers once in ``on_train_epoch_end`` keeps that invariant at the start of every
    epoch. Lightning breaks it in one case: a run resumed from a checkpoint written at the *last* batch of an epoch
    (e.g. ``every_n_train_steps`` dividing the epoch length) goes straight to the next epoch without calling that
    epoch's ``on_train_epoch_end``, so the step would be lost and the resumed run would differ from an
    uninterrupted one. Called at every batch start, it costs an integer comparison.
    """
    schedulers = module.lr_schedulers()
    if schedulers is None:
        return
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
        if isinstance(scheduler, LRScheduler):
            while scheduler.last_epoch < module.current_epoch:
                scheduler.step()


def next_hpc_checkpoint(folder: Path) -> Path:
    """The name Lightning gives the next SLURM requeue checkpoint in ``folder``: ``hpc_ckpt_<highest N + 1>.ckpt``."""
    found = hpc_checkpoint(folder)
    number = int(HPC_PATTERN.fullmatch(found.name).group(1)) if found is not None else 0
    return folder / f"hpc_ckpt_{number + 1}.ckpt"


# --- where evaluations of a checkpoint write -------------------------------------------------------------------
def run_folder_of(checkpoint_path: Path) -> Path:
    """The run folder of a checkpoint: ``runs/<name>/version_N`` for ``…/version_N/checkpoints/x.ckpt``, else the
    folder holding the file."""
    parent = checkpoint_path.parent
    return parent.parent if parent.name == "checkpoints" else parent


# --- atomic writes ---------------------------------------------------------------------------------------------
def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` so that ``path`` is either the old file or the complete new one: serialise
    in memory, write a temporary file in the same folder, flush, fsync, rename over ``path``, fsync the folder.

    Raises CheckpointWriteError (one line naming the path and the cause) for a full disk, a read-only folder or
    missing permissions; the temporary file is removed and every file already in the folder is left as it was.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        temporary = None
        _fsync_folder(path.parent)
    except OSError as err:
        failure = CheckpointWriteError(
            f"cannot write checkpoint {path}: {err.strerror or err} (errno {err.errno}); free space on that disk or "
            f"write elsewhere (--trainer.logger.init_args.save_dir); the checkpoints already in {path.parent} are "
            f"intact"
        )
        failure.errno = err.errno  # (one message argument keeps str() to that message)
        raise failure from err
    finally:
        if temporary is not None:
            with suppress(OSError):
                os.unlink(temporary)


def _file_mode(path: Path) -> int:
    """The permissions of the file being replaced, else those a new file gets (0o666 less the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX: fsync of the directory); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with :func:`atomic_save` for local paths: Lightning's own save writes through
    fsspec, whose local transaction stages the file in the system temp folder and copies it across file systems, so a
    full disk left a truncated ``last.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


def use_atomic_writes(trainer: L.Trainer) -> None:
    """Replace the trainer's plain TorchCheckpointIO (the default) by :class:`AtomicCheckpointIO`; a CheckpointIO
    configured by the user is kept."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# --- a resumed run takes its settings from the command line ---------------------------------------------------
def settings_differences(
    checkpoint: dict[str, Any], model_config: dict[str, Any] | None, data_config: dict[str, Any] | None
) -> list[str]:
    """``model.<arg> <new> (checkpoint <old>)`` for every system and data argument whose configured value differs
    from the one the checkpoint was written with (the network is compared by :func:`check_signature`)."""
    differences = []
    pairs = (
        ("model", checkpoint.get("hyper_parameters") or {}, model_config),
        ("data", checkpoint.get("datamodule_hyper_parameters") or {}, data_config),
    )
    for prefix, saved, config in pairs:
        init_args = (config or {}).get("init_args") or {}
        for key, value in init_args.items():
            if key.startswith("_") or key not in saved:
                continue
            is_network = isinstance(value, dict) and key not in NON_ARCHITECTURE_ARGS and "class_path" in value
            if not is_network and not same_value(value, saved[key]):
                differences.append(f"{prefix}.{key} {_brief(value)} (checkpoint {_brief(saved[key])})")
    return differences


def _brief(value: Any) -> str:
    """A setting in a few characters: ``torch.optim.Adam(lr=0.001)`` for a class with arguments."""
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={v}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path']}({args})"
    return _normal(value) if callable(value) else str(value)


class ConfiguredOptimizerSettings(L.Callback):
    """On resume, the optimizer and scheduler settings of the config (learning rates, momentum, weight decay, the
    scheduler's arguments) replace those stored in the checkpoint, from the resumed step on; the optimizer's state
    (momentum buffers, Adam moments) and the scheduler's progress are kept.

    Lightning restores ``optimizer.load_state_dict(saved)``, which also restores the saved param-group settings, so
    a changed learning rate would be silently ignored. The checkpoint dict Lightning restores from is the one it
    hands to ``on_load_checkpoint``; at ``on_fit_start`` (after the optimizers are configured, before their state is
    restored) its optimizer and scheduler entries are rewritten:

    - same optimizer class: every param-group setting from the configured optimizer; the learning rate keeps the
      schedule's progress, lr = lr_saved · lr0_configured / lr0_saved (lr0: the group's initial lr), and the
      scheduler's ``base_lrs`` follow;
    - another optimizer class, or another scheduler: the configured optimizer (and scheduler) start afresh, the
      weights and the loop position are restored.
    """

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self._checkpoint: dict[str, Any] | None = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._checkpoint = checkpoint if trainer.state.fn == "fit" else None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        if not checkpoint or "optimizer_states" not in checkpoint:
            return
        saved_hparams = checkpoint.get("hyper_parameters") or {}
        hparams = dict(pl_module.hparams)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        saved_schedulers = checkpoint.get("lr_schedulers") or []
        new_schedule = len(saved_schedulers) != len(schedulers) or _changed(saved_hparams, hparams, "lr_scheduler")
        restarted = []
        for i, optimizer in enumerate(trainer.optimizers[: len(checkpoint["optimizer_states"])]):
            fresh, saved = optimizer.state_dict(), checkpoint["optimizer_states"][i]
            scheduler = schedulers[i] if i < len(schedulers) and i < len(saved_schedulers) else None
            if not _same_group_keys(saved, fresh) or _changed(saved_hparams, hparams, "optimizer"):
                checkpoint["optimizer_states"][i] = saved = fresh  # another optimizer class: its state starts anew
                restarted.append(f"optimizer {i}")
            ratios = _merge_groups(saved["param_groups"], fresh["param_groups"])
            if new_schedule or saved is fresh:  # the configured schedule starts from the configured rates
                for saved_group, fresh_group in zip(saved["param_groups"], fresh["param_groups"]):
                    saved_group["lr"] = fresh_group["lr"]
                if scheduler is not None:
                    saved_schedulers[i] = scheduler.state_dict()
                    restarted.append(f"lr scheduler {i}")
            elif isinstance(scheduler, LRScheduler):  # the schedule's progress is kept, scaled to the new rates
                state = saved_schedulers[i]
                state["base_lrs"] = list(scheduler.base_lrs)
                if "_last_lr" in state:
                    state["_last_lr"] = [lr * r for lr, r in zip(state["_last_lr"], ratios)]
        if restarted:
            self.report(f"the configuration changes the optimization: {', '.join(restarted)} start afresh")


class KeepLastCheckpointName(L.Callback):
    """A continued run overwrites its folder's ``last.ckpt``: ModelCheckpoint reloads the name of its last file only
    if the folder has not moved, and otherwise writes ``last-v1.ckpt`` next to it."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            last_checkpoint_path(trainer)


def _same_group_keys(saved: dict[str, Any], fresh: dict[str, Any]) -> bool:
    """Same optimizer class, as far as the state dicts tell: the same setting names in every group."""
    saved_groups, fresh_groups = saved.get("param_groups", []), fresh.get("param_groups", [])
    keys = lambda group: set(group) - {"params", "initial_lr"}
    return len(saved_groups) == len(fresh_groups) and all(
        keys(a) == keys(b) for a, b in zip(saved_groups, fresh_groups)
    )


def _changed(saved_hparams: dict[str, Any], hparams: dict[str, Any], key: str | None) -> bool:
    """The configured class of ``key`` (optimizer, lr_scheduler) or its arguments differ from the checkpoint's."""
    if key is None or key not in saved_hparams or key not in hparams:
        return False
    old, new = saved_hparams[key], hparams[key]
    if not (isinstance(old, dict) or isinstance(new, dict)):
        return not same_value(str(old), str(new))
    old_class = old.get("class_path") if isinstance(old, dict) else old
    new_class = new.get("class_path") if isinstance(new, dict) else new
    if old_class != new_class:
        return True
    return key == "lr_scheduler" and not same_value(old.get("init_args"), new.get("init_args"))


def _merge_groups(saved_groups: list[dict[str, Any]], fresh_groups: list[dict[str, Any]]) -> list[float]:
    """Write the configured settings of ``fresh_groups`` into ``saved_groups`` (in place); returns per group the
    factor lr0_configured / lr0_saved applied to the saved learning rate (1.0 where it is unchanged)."""
    ratios = []
    for saved, fresh in zip(saved_groups, fresh_groups):
        old0 = saved.get("initial_lr", saved["lr"])
        new0 = fresh.get("initial_lr", fresh["lr"])
        ratio = 1.0 if new0 == old0 else (new0 / old0 if old0 else None)
        for key, value in fresh.items():
            if key not in ("params", "lr"):
                saved[key] = value
        if ratio is None:  # the saved rate was 0: nothing to scale, take the configured one
            saved["lr"], ratio = fresh["lr"], 1.0
        elif ratio != 1.0:
            saved["lr"] = saved["lr"] * ratio
        ratios.append(ratio)
    return ratios


__all__ = [
    "EPOCH_SUMS_KEY",
    "INITIALIZER_CONFIG_KEY",
    "RUN_FOLDER_KEY",
    "SIGNATURE_KEY",
    "SIGN_GENERATOR_KEY",
    "WARM_START_KEY",
    "AtomicCheckpointIO",
    "CheckpointSignature",
    "ConfiguredOptimizerSettings",
    "KeepLastCheckpointName",
    "atomic_save",
    "catch_up_epoch_schedulers",
    "check_signature",
    "hpc_checkpoint",
    "last_checkpoint_path",
    "latest_checkpoint",
    "next_hpc_checkpoint",
    "read_checkpoint",
    "run_folder_of",
    "settings_differences",
    "signature",
    "use_atomic_writes",
]
