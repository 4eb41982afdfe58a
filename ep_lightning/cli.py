"""LightningCLI entry point: ``python train.py fit|validate|test|predict|gdu --config configs/….yaml``.

Every run loads ``configs/defaults.yaml`` (trainer, logger, checkpointing, monitors) first; the ``--config`` files
given on the command line override it. Besides LightningCLI's behaviour:

- ``fit --ckpt_path last`` continues the latest run of the same config (its folder, its ``last.ckpt``) and says so;
- a checkpoint of another model class, architecture or algorithm is refused before anything is built;
- SIGTERM / SIGINT stop within one training step and leave ``last.ckpt`` (``ep_lightning.interrupt``);
- errors in the configuration, the data or the environment are one line on stderr, and a run that fails to start
  leaves no empty run folder behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ep_lightning.config_checks import (
    check_checkpoint_matches,
    check_relaxation_steps,
    check_trainer_settings,
    checkpoint_signature,
    config_file_errors,
    user_error,
)
from ep_lightning.data import ImageDataModule
from ep_lightning.errors import ConfigError, DivergenceError
from ep_lightning.interrupt import SIGNALS as STOP_SIGNALS
from ep_lightning.interrupt import GracefulInterrupt, Interrupted
from ep_lightning.progress import SummaryWithoutFlops, progress_for_output
from ep_lightning.runtime import configure_threads, tune_allocator
from ep_lightning.trainer import EPTrainer

#: The repository root (configs/ lives here); default config files are found from any working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = REPO_ROOT / "configs" / "defaults.yaml"
#: Checkpoint key of the config signature (model class, algorithm, sub-network classes and arguments).
SIGNATURE_KEY = "ep_lightning_signature"
#: TensorBoardLogger's own default run name; a run left with it is named after its first --config file.
_TB_DEFAULT_NAME = "lightning_logs"


def _is_rank_zero() -> bool:
    """True in the launching process (DDP children of ``ddp`` have RANK/LOCAL_RANK > 0 in their environment)."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _say(message: str) -> None:
    if _is_rank_zero():
        print(message, file=sys.stderr, flush=True)


def _as_dict(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def _is_print_config(arg: str) -> bool:
    return arg == "--print_config" or arg.startswith("--print_config=")


class CheckpointSignature(L.Callback):
    """Writes the run's model class, algorithm and sub-network configuration into every checkpoint, so that a later
    ``--ckpt_path`` with another config is refused by name instead of loading weights into the wrong model."""

    def __init__(self, signature: dict[str, Any]) -> None:
        self.signature = signature

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[SIGNATURE_KEY] = self.signature


class _RunFolder:
    """The logger folder of this run, to remove it again if the run fails before writing a checkpoint."""

    root: Path | None = None
    existing: frozenset[str] = frozenset()

    created: tuple[Path, ...] = ()

    @classmethod
    def reset(cls) -> None:
        cls.root, cls.logger, cls.existing, cls.created = None, None, frozenset(), ()

    @classmethod
    def remember(cls, root: Path) -> None:
        cls.root = root
        cls.created = tuple(p for p in (root, root.parent) if not p.exists())  # to remove again if left empty
        cls.existing = frozenset(p.name for p in root.iterdir()) if root.is_dir() else frozenset()

    logger: Any = None

    @classmethod
    def remove_empty_new(cls) -> None:
        """Delete this run's version folder if this process created it and it holds no checkpoint (a failed start);
        other folders (e.g. of a run of the same config started meanwhile) are left alone."""
        root, logger = cls.root, cls.logger
        if root is None or logger is None or getattr(logger, "_version", None) is None or not _is_rank_zero():
            return  # the logger never chose its version: it created no folder
        folder = Path(logger.log_dir)
        new = folder.parent == root and folder.name not in cls.existing and folder.is_dir()
        if new and not any(folder.rglob("*.ckpt")):
            shutil.rmtree(folder, ignore_errors=True)
        for path in cls.created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()


class EPLightningCLI(LightningCLI):
    """LightningCLI with ``--threads``, ``--malloc_tuning``, ``--test_after_fit`` and the behaviour above."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="CPU threads for torch (default: $OMP_NUM_THREADS, else 1; see README 'Performance').",
        )
        parser.add_argument(
            "--malloc_tuning",
            type=bool,
            default=True,
            help="Keep freed CPU tensors in the heap (glibc mallopt; ep_lightning.runtime.tune_allocator): "
            "~25 %% faster small-batch EP on CPU, numerics unchanged.",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the final weights and print test accuracy.",
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``gdu`` (``EPTrainer.gdu``: EP updates against BPTT gradients, step by step)."""
        return {**LightningCLI.subcommands(), "gdu": {"model", "dataloaders", "datamodule"}}

    # --- before anything is built ------------------------------------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parsing; for ``--print_config`` the printed config also carries the run name derived from
        the config file (for runs it is set in ``_parse_ckpt_path``, after parsing)."""
        argv = sys.argv[1:] if args is None else args
        if not isinstance(argv, list) or not any(_is_print_config(a) for a in argv):
            super().parse_arguments(parser, args)
            return
        probe = parser.parse_args([a for a in argv if not _is_print_config(a)])
        config = probe[probe.subcommand] if probe.get("subcommand") else probe
        self._name_run_after_config(config)
        init_args, _ = self._logger_settings(config)
        name = init_args.get("name") if init_args is not None else None
        if name not in (None, _TB_DEFAULT_NAME):
            at = next(i for i, a in enumerate(argv) if _is_print_config(a))
            argv = [*argv[:at], f"--trainer.logger.init_args.name={name}", *argv[at:]]
        self.config = parser.parse_args(argv)

    def _subconfig(self) -> Any:
        return self.config[self.config.subcommand] if self.config.get("subcommand") else self.config

    def _parse_ckpt_path(self) -> None:
        """Resolve ``fit --ckpt_path last`` to the latest run of this config, and refuse a missing, unreadable or
        foreign checkpoint, before LightningCLI applies the checkpoint's hyperparameters to the config."""
        config = self._subconfig()
        self._name_run_after_config(config)
        self._check_config(config)
        ckpt_path = config.get("ckpt_path")
        subcommand = self.config.get("subcommand")
        init_args, _ = self._logger_settings(config)
        if subcommand == "fit" and ckpt_path == "last" and init_args is not None and init_args.get("save_dir"):
            config.ckpt_path = str(self._latest_run_checkpoint(config))
            ckpt_path = config.ckpt_path  # (without a logger, Lightning's own lookup in default_root_dir applies)
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            path = Path(ckpt_path)
            if not path.is_file():
                raise ConfigError(
                    f"ckpt_path={ckpt_path!r}: no such file; give the path of a .ckpt file written by a run "
                    f"(e.g. runs/<name>/version_<N>/checkpoints/last.ckpt) or `--ckpt_path last` with fit"
                )
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any failure to unpickle means an unusable file
                raise ConfigError(
                    f"ckpt_path={ckpt_path!r} is truncated or not a checkpoint ({type(err).__name__}); use another "
                    f"file, e.g. an earlier checkpoint of the same run"
                ) from None
            check_checkpoint_matches(str(path), checkpoint, checkpoint_signature(_as_dict(config.get("model"))))
        super()._parse_ckpt_path()

    def _check_config(self, config: Any) -> None:
        """Checks that need no built object (run right after parsing, before seeding or any output)."""
        check_trainer_settings(_as_dict(config.get("trainer")) or {})
        check_relaxation_steps(_as_dict(config.get("model")) or {})
        init_args, _ = self._logger_settings(config)
        if init_args is not None and init_args.get("save_dir") is not None:
            save_dir = Path(init_args.get("save_dir"))
            _check_writable(save_dir, "trainer.logger.init_args.save_dir")
            _RunFolder.remember(save_dir / str(init_args.get("name") or ""))

    def _logger_settings(self, config: Any) -> tuple[Any, Any]:
        """(logger init_args namespace, class path) of a single configured logger, else (None, None)."""
        logger = config.get("trainer", {}).get("logger") if hasattr(config, "get") else None
        if isinstance(logger, list):
            logger = logger[0] if len(logger) == 1 else None
        if logger is None or isinstance(logger, bool) or not hasattr(logger, "get"):
            return None, None
        return logger.get("init_args"), logger.get("class_path")

    def _name_run_after_config(self, config: Any) -> None:
        """A TensorBoard run without an explicit name is named after the first --config file (p1h_ep, …)."""
        init_args, class_path = self._logger_settings(config)
        if init_args is None or not str(class_path).endswith("TensorBoardLogger"):
            return
        files = config.get("config") or []
        if init_args.get("name") in (None, _TB_DEFAULT_NAME) and files:
            first = files[0]
            path = getattr(first, "relative", None) or getattr(first, "abs_path", None) or str(first)
            init_args.name = Path(str(path)).stem

    def _latest_run_checkpoint(self, config: Any) -> Path:
        """The newest checkpoint file (as Lightning's own ``last``: by modification time) in
        ``<save_dir>/<name>/version_<N>/checkpoints/`` of the highest N that has one; the logger is pointed at that
        version, so the continued run writes into the same folder."""
        init_args, _ = self._logger_settings(config)
        root = Path(init_args.get("save_dir")) / str(init_args.get("name") or "")
        runs = []
        for folder in root.glob("version_*"):
            suffix = folder.name.removeprefix("version_")
            files = list((folder / "checkpoints").glob("*.ckpt"))
            if suffix.isdigit() and files:
                runs.append((int(suffix), max(files, key=lambda f: (f.stat().st_mtime, f.name == "last.ckpt"))))
        if not runs:
            raise ConfigError(
                f"ckpt_path='last': no earlier run of this config has a checkpoint ({root}/version_*/checkpoints/"
                f"*.ckpt); start without --ckpt_path, or give the checkpoint file"
            )
        version, path = max(runs)
        init_args.version = version
        _say(f"resuming from {path}")
        return path

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        configure_threads(config.get("threads"))
        if config.get("malloc_tuning", True):
            tune_allocator()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer with this project's progress display and model summary, the stop-signal handler and the
        checkpoint signature (see module docstring)."""
        trainer = super().instantiate_trainer(**kwargs)
        _RunFolder.logger = trainer.logger
        callbacks = trainer.callbacks
        for i, callback in enumerate(callbacks):
            if type(callback) is TQDMProgressBar:
                callbacks[i] = progress_for_output()
            elif type(callback) is ModelSummary:
                callbacks[i] = SummaryWithoutFlops(max_depth=callback._max_depth)
        callbacks.append(GracefulInterrupt())
        callbacks.append(CheckpointSignature(checkpoint_signature(_as_dict(self._subconfig().get("model")))))
        return trainer

    # --- after a subcommand -------------------------------------------------------------------------------------
    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)
            self._print_test_summary()

    def after_test(self) -> None:
        self._print_test_summary()

    def _print_test_summary(self) -> None:
        accuracy = self.trainer.callback_metrics.get("test/acc")
        if accuracy is not None and self.trainer.is_global_zero:
            value = 100.0 * float(accuracy)
            print(f"test accuracy {value:.2f} % (error {100.0 - value:.2f} %)", flush=True)


def _check_writable(folder: Path, field: str) -> None:
    """ConfigError naming ``field`` unless ``folder`` is, or can be created as, a writable folder (nothing is
    created here: a run that fails to start leaves no folder behind)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"no permission to write in {existing}"
    if problem is not None:
        raise ConfigError(
            f"{field}={str(folder)!r} is not writable ({problem}); point it at a folder you can write, "
            f"e.g. --{field} /tmp/runs"
        )


class _DropAdvertisement(logging.Filter):
    """Lightning's info line recommending a cloud logging product on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence messages that carry no information for this project: the logging advertisement, the deprecation
    warning that Lightning's own pytree helper triggers with recent torch, and the empty-validation notice (a run
    without a validation split returns no validation loader on purpose)."""
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisement) for f in logger.filters):
            logger.addFilter(_DropAdvertisement())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    # the systems log epoch means that they already summed over ranks themselves (metrics.EpochMeans)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('train/")


def cli_main(args: list[str] | None = None, run: bool = True) -> EPLightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by tests).

    A bad configuration, checkpoint or data file (or a diverged run) is reported as one line ``error: <message>``
    on stderr with exit status 2 (1 for divergence) instead of a traceback through jsonargparse and Lightning; a run
    stopped by SIGTERM/SIGINT says where its checkpoint is and exits with 128 + the signal number. Set
    ``EP_LIGHTNING_TRACEBACK=1`` to see the full traceback.
    """
    quiet_lightning()
    _RunFolder.reset()
    argv = sys.argv[1:] if args is None else list(args)
    problem = config_file_errors(argv, [DEFAULTS])
    if problem is not None:
        _say(f"error: {problem}")
        raise SystemExit(2)
    subcommands = ("fit", "validate", "test", "predict", "gdu")
    defaults = {"default_config_files": [str(DEFAULTS)]} if DEFAULTS.is_file() else {}
    handlers = _signal_handlers()
    try:
        return EPLightningCLI(
            L.LightningModule,
            ImageDataModule,  # any of the package's DataModules (configs/defaults.yaml picks MNIST)
            trainer_class=EPTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            # with subcommands each subcommand's parser reads the defaults; without (run=False) the main parser
            parser_kwargs={name: dict(defaults) for name in subcommands} if run else dict(defaults),
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )
    except Interrupted as err:
        message = err.summary() if hasattr(err, "summary") else str(err)
        if err.checkpoint:
            message += "; continue with the same command and --ckpt_path last"
        _say(message)
        raise SystemExit(128 + int(err.signum)) from None
    except Exception as err:  # reliability: one clear line for errors written for the user (config_checks.py)
        cause = user_error(err)
        if cause is None or os.environ.get("EP_LIGHTNING_TRACEBACK") == "1":
            raise
        _RunFolder.remove_empty_new()
        _say(f"error: {cause}")
        raise SystemExit(1 if isinstance(cause, DivergenceError) else 2) from cause
    finally:  # Lightning restores the handlers it found (the stop handler) when a stage ends; put back the caller's
        _restore_signal_handlers(handlers)


def _signal_handlers() -> dict[int, Any]:
    return (
        {s: signal.getsignal(s) for s in STOP_SIGNALS} if threading.current_thread() is threading.main_thread() else {}
    )


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


__all__ = ["EPLightningCLI", "cli_main", "configure_threads"]
