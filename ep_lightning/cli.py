"""LightningCLI entry point: ``python train.py fit|validate|test|predict|gdu --config configs/….yaml`` (also
``python -m ep_lightning …`` and the ``ep-lightning`` console script).

Every run loads ``configs/defaults.yaml`` (trainer, logger, checkpointing, monitors) first; the ``--config`` files
given on the command line override it. A ``--config`` path that does not exist is also looked up among the shipped
configs (``configs/mnist/p1h_ep.yaml`` works after ``pip install`` from any folder). Besides LightningCLI's behaviour:

- ``--ckpt_path last`` takes the newest readable checkpoint of the latest run of the same config, for every
  subcommand, and says which; ``fit`` continues writing into that run's folder;
- the configuration wins over the checkpoint's stored settings (LightningCLI does the reverse); a checkpoint of
  another model class, architecture or algorithm is refused before anything is built, and one line lists the
  settings that differ from the checkpoint's;
- ``validate``/``test``/``predict`` need a checkpoint (``--evaluate_untrained true`` to evaluate initial weights) and
  write next to the checkpoint's run (``<run>/<subcommand>/version_N``); ``predict`` writes ``predictions.pt``;
- SIGTERM / SIGINT / SIGUSR1 stop within one training step and leave ``last.ckpt`` (``ep_lightning.interrupt``);
  under SLURM a requeued job resumes from Lightning's requeue checkpoint;
- checkpoints are written atomically; errors in the configuration, the data, the checkpoints or the disk are one
  line on stderr, and a run that fails to start leaves no empty run folder behind.
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
from typing import Any, ClassVar, NoReturn

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import ep_lightning.systems  # noqa: F401 - registers the system classes for `--model EquilibriumModule`
from ep_lightning.checkpoints import (
    RUN_FOLDER_KEY,
    SPECIAL_PATHS,
    CheckpointSignature,
    ConfiguredOptimizerSettings,
    KeepLastCheckpointName,
    check_signature,
    hpc_checkpoint,
    latest_checkpoint,
    read_checkpoint,
    run_folder_of,
    settings_differences,
    signature,
    use_atomic_writes,
)
from ep_lightning.config_checks import (
    check_relaxation_steps,
    check_trainer_settings,
    config_file_errors,
    parse_error_line,
    user_error,
)
from ep_lightning.data import ImageDataModule
from ep_lightning.errors import CheckpointWriteError, ConfigError, DivergenceError
from ep_lightning.hparams import HyperparameterSummary, flatten
from ep_lightning.interrupt import SIGNALS as STOP_SIGNALS
from ep_lightning.interrupt import GracefulInterrupt, Interrupted
from ep_lightning.predictions import PredictionWriter
from ep_lightning.progress import OneLineSummary, ResumeLine, progress_for_output
from ep_lightning.runtime import configure_threads, tune_allocator
from ep_lightning.systems.base import EnergySystem
from ep_lightning.trainer import EPTrainer

#: The shipped configs: ``configs/`` of the repository, which the package reaches through ``ep_lightning/configs``
#: (a link in the checkout, a copy in an installed package).
CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULTS = CONFIGS / "defaults.yaml"
#: TensorBoardLogger's own default run name; a run left with it is named after its first --config file.
_TB_DEFAULT_NAME = "lightning_logs"
SUBCOMMANDS = ("fit", "validate", "test", "predict", "gdu")
#: Subcommands that evaluate a checkpoint: they write next to its run, not into a new training version.
EVALUATIONS = ("validate", "test", "predict", "gdu")


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


class EPArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line without the 60-line usage dump; an unknown key names the
    closest valid ones (``config_checks.parse_error_line``)."""

    #: The arguments being parsed (set by ``EPLightningCLI.parse_arguments``), to tell where an unknown key came from.
    argv: ClassVar[list[str]] = []

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or message.startswith('expected "subcommand"'):
            super().error(message, ex)  # internal attempts raise; a missing subcommand shows the usage
        parser = getattr(ex, "subcommand_parser", None) or self
        line = parse_error_line(message, parser, self.argv)
        _say(f"error: {line}")
        raise SystemExit(2)


class _RunFolder:
    """The logger folder of this run, to remove it again if the run fails before training starts."""

    root: Path | None = None
    existing: frozenset[str] = frozenset()
    created: tuple[Path, ...] = ()
    logger: Any = None
    started: bool = False

    @classmethod
    def reset(cls) -> None:
        cls.root, cls.logger, cls.existing, cls.created, cls.started = None, None, frozenset(), (), False

    @classmethod
    def remember(cls, root: Path) -> None:
        cls.root = root
        cls.created = tuple(p for p in (root, root.parent) if not p.exists())  # to remove again if left empty
        cls.existing = frozenset(p.name for p in root.iterdir()) if root.is_dir() else frozenset()

    @classmethod
    def remove_empty_new(cls) -> None:
        """Delete this run's version folder if this process created it, training never started and it holds no
        checkpoint (a failed start); other folders (e.g. of a run of the same config started meanwhile) are left
        alone."""
        root, logger = cls.root, cls.logger
        if root is None or logger is None or cls.started or not _is_rank_zero():
            return
        folder = Path(logger.log_dir)
        new = folder.parent == root and folder.name not in cls.existing and folder.is_dir()
        if new and not any(folder.rglob("*.ckpt")):
            shutil.rmtree(folder, ignore_errors=True)
        for path in cls.created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()


class _TrainingStarted(L.Callback):
    """Marks the run folder as in use once training starts: later failures keep what it wrote."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _RunFolder.started = True


class EPLightningCLI(LightningCLI):
    """LightningCLI with ``--threads``, ``--malloc_tuning``, ``--test_after_fit``, ``--evaluate_untrained`` and the
    behaviour above."""

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
            "~25 % faster small-batch EP on CPU, numerics unchanged.",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the final weights and print test accuracy.",
        )
        parser.add_argument(
            "--evaluate_untrained",
            type=bool,
            default=False,
            help="validate/test/predict without --ckpt_path: evaluate the freshly initialised network (otherwise "
            "they refuse to run without a checkpoint).",
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
        EPArgumentParser.argv = list(argv) if isinstance(argv, list) else []
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
        """Where LightningCLI applies a checkpoint's hyperparameters over the parsed config (so the checkpoint, not
        the command line, would decide eval_steps, T, learning rates, …), the parsed config wins here: the
        checkpoint is resolved (``last``, SLURM requeue), read, checked against the config's model and its differing
        settings listed."""
        config = self._subconfig()
        subcommand = self.config.get("subcommand")
        self._name_run_after_config(config)
        self._check_config(config, subcommand)
        if subcommand is not None:
            ckpt_path = self._resolve_ckpt_path(config, subcommand)
            if ckpt_path is None and subcommand in ("validate", "test", "predict") and not config.evaluate_untrained:
                raise ConfigError(
                    f"{subcommand} needs trained weights: give --ckpt_path <file.ckpt> or --ckpt_path last (the latest "
                    f"run of this config), or --evaluate_untrained true to evaluate the initial weights"
                )
            if ckpt_path is not None and ckpt_path not in SPECIAL_PATHS:
                self._check_checkpoint(config, Path(ckpt_path))
                if subcommand in EVALUATIONS:
                    self._write_next_to(config, Path(ckpt_path), subcommand)
                    # the checkpoint's ModelCheckpoint state names its run's folder; an evaluation does not checkpoint
                    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
        self._check_output_folder(config)

    def _check_config(self, config: Any, subcommand: str | None) -> None:
        """Checks that need no built object (run right after parsing, before seeding or any output)."""
        check_trainer_settings(_as_dict(config.get("trainer")) or {})
        check_relaxation_steps(_as_dict(config.get("model")) or {})
        data = _as_dict(config.get("data")) or {}
        if subcommand == "validate" and (data.get("init_args") or {}).get("val_size") == 0:
            raise ConfigError(
                "validate needs a validation split but data.init_args.val_size=0 (all training images are trained on); "
                "set --data.init_args.val_size N to hold out N training images (the Initialized EP configs use 10000)"
            )

    def _check_output_folder(self, config: Any) -> None:
        init_args, _ = self._logger_settings(config)
        if init_args is not None and init_args.get("save_dir") is not None:
            root = Path(init_args.get("save_dir")) / str(init_args.get("name") or "")
            _check_writable(root, "trainer.logger.init_args.save_dir")
            _RunFolder.remember(root)

    def _resolve_ckpt_path(self, config: Any, subcommand: str) -> str | None:
        """The checkpoint file to use: ``last`` → the newest readable one of the latest run of this config; none
        given to ``fit`` under SLURM → Lightning's requeue checkpoint if there is one; otherwise as given."""
        ckpt_path = config.get("ckpt_path")
        init_args, _ = self._logger_settings(config)
        default_root = Path(config.get("trainer", {}).get("default_root_dir") or os.getcwd())
        if ckpt_path == "last":
            if init_args is not None and init_args.get("save_dir"):
                root = Path(init_args.get("save_dir")) / str(init_args.get("name") or "")
                found = latest_checkpoint(root, _say)
                where = f"{root}/version_*/checkpoints/*.ckpt"
            else:  # no logger: Lightning's ModelCheckpoint writes into <default_root_dir>/checkpoints
                root = default_root
                found = latest_checkpoint(root, _say, versions=False)
                where = f"{root}/checkpoints/*.ckpt"
            if found is None:
                raise ConfigError(
                    f"ckpt_path='last': no earlier run of this config has a readable checkpoint ({where}); start "
                    f"without --ckpt_path, or give the checkpoint file"
                )
            version, path = found
            if subcommand == "fit" and version is not None:
                init_args.version = version  # continue writing into that run's folder
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            ckpt_path = config.ckpt_path = str(path)
            if subcommand != "fit":
                _say(f"{subcommand}: checkpoint {path}")
        elif subcommand == "fit" and ckpt_path in (None, "hpc") and (ckpt_path == "hpc" or SLURMEnvironment.detect()):
            path = hpc_checkpoint(default_root)
            if path is None and ckpt_path == "hpc":
                raise ConfigError(f"ckpt_path='hpc': no hpc_ckpt_<N>.ckpt in {default_root} (trainer.default_root_dir)")
            if path is not None:  # a requeued job: Lightning resumes from it, so it is checked and reported like others
                ckpt_path = config.ckpt_path = str(path)
                self._continue_run_folder(config, read_checkpoint(path))
        return ckpt_path

    def _continue_run_folder(self, config: Any, checkpoint: dict[str, Any]) -> None:
        """Point the logger at the run folder recorded in ``checkpoint`` if it belongs to this config's runs."""
        init_args, _ = self._logger_settings(config)
        folder = checkpoint.get(RUN_FOLDER_KEY)
        if init_args is None or not init_args.get("save_dir") or not folder:
            return
        root = Path(init_args.get("save_dir")) / str(init_args.get("name") or "")
        if Path(folder).parent.absolute() == root.absolute():
            suffix = Path(folder).name.removeprefix("version_")
            init_args.version = int(suffix) if suffix.isdigit() else Path(folder).name
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def _check_checkpoint(self, config: Any, path: Path) -> None:
        """Refuse a foreign or unreadable checkpoint; list the settings in which the run differs from it."""
        checkpoint = read_checkpoint(path)
        model = _as_dict(config.get("model"))
        check_signature(path, checkpoint, signature(model))
        differences = settings_differences(checkpoint, model, _as_dict(config.get("data")))
        if differences:
            _say(f"settings that differ from the checkpoint (the configuration is used): {'; '.join(differences)}")

    def _write_next_to(self, config: Any, checkpoint: Path, subcommand: str) -> None:
        """Evaluations of a checkpoint write into ``<its run folder>/<subcommand>/version_N``."""
        init_args, _ = self._logger_settings(config)
        if init_args is None or "save_dir" not in init_args:
            return
        init_args.save_dir = str(run_folder_of(checkpoint))
        init_args.name = subcommand
        init_args.version = None

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

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        configure_threads(config.get("threads"))
        if config.get("malloc_tuning", True):
            tune_allocator()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer with this project's progress display, model summary, stop-signal handler, checkpoint
        signature, atomic checkpoint writes, HPARAMS entry and, for ``predict``, the prediction writer."""
        trainer = super().instantiate_trainer(**kwargs)
        _RunFolder.logger = trainer.logger
        config = self._subconfig()
        model = _as_dict(config.get("model"))
        callbacks = trainer.callbacks
        for i, callback in enumerate(callbacks):
            if type(callback) is TQDMProgressBar:
                callbacks[i] = progress_for_output()
            elif type(callback) is ModelSummary:
                callbacks[i] = OneLineSummary()
        callbacks += [GracefulInterrupt(), CheckpointSignature(signature(model)), _TrainingStarted()]
        callbacks += [ConfiguredOptimizerSettings(report=_say), KeepLastCheckpointName(), ResumeLine()]
        settings = {**flatten(model, "model"), **flatten(_as_dict(config.get("data")), "data")}
        callbacks.append(HyperparameterSummary(settings))
        if self.subcommand == "predict" and not any(isinstance(c, PredictionWriter) for c in callbacks):
            callbacks.append(PredictionWriter())
        use_atomic_writes(trainer)
        return trainer

    # --- around a subcommand ------------------------------------------------------------------------------------
    def _say_folder(self) -> None:
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.loggers:
            _check_writable(folder, "trainer.logger.init_args.save_dir")
        _say(f"writing to {folder}")

    before_fit = before_validate = before_test = before_predict = before_gdu = _say_folder

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
            f"{folder} is not writable ({problem}); point {field} at a folder you can write, e.g. --{field} /tmp/runs"
        )


def resolve_config_paths(argv: list[str]) -> list[str]:
    """``--config X`` where X is not a file but names a shipped config (``configs/mnist/p1h_ep.yaml`` or
    ``mnist/p1h_ep.yaml``) points at the shipped file, so installed packages run from any folder."""
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        value, prefix = None, ""
        if arg == "--config" and i + 1 < len(resolved):
            value, i = resolved[i + 1], i + 1
        elif arg.startswith("--config="):
            value, prefix = arg.split("=", 1)[1], "--config="
        if value is None or Path(value).exists():
            continue
        shipped = CONFIGS / Path(value).as_posix().removeprefix("configs/")
        if shipped.is_file():
            resolved[i] = f"{prefix}{shipped}"
    return resolved


class _DropNoise(logging.Filter):
    """Lightning's info lines that carry no information here: the logging advertisement, the "GPU available: False"
    family of lines, and the checkpoint-restore lines (the CLI prints what it resumes from, and where)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        restore = ("Restoring states from", "Restored all states from", "Loaded model weights from")
        if "litlogger" in message or message.startswith(restore):
            return False
        return not message.endswith((", used: False", " using: 0 TPU cores", "using: 0 HPUs"))


def quiet_lightning() -> None:
    """Silence messages that carry no information for this project: see ``_DropNoise``, the deprecation warning
    that Lightning's own pytree helper triggers with recent torch, and the empty-validation notice (a run without a
    validation split returns no validation loader on purpose)."""
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    # train.py passes its own arguments with shipped --config paths resolved
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    # the systems log epoch means that they already summed over ranks themselves (systems.base.EpochMeans)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('train/")
    # the DivergenceGuard comes from the system's configure_callbacks on every run, also a resumed one
    warnings.filterwarnings("ignore", message=r"(?s)Be aware that when using `ckpt_path`.*\['DivergenceGuard'\]\.$")


def cli_main(args: list[str] | None = None, run: bool = True) -> EPLightningCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (used by tests).

    A bad configuration, checkpoint or data file (or a diverged run, or a failed checkpoint write) is reported as one
    line ``error: <message>`` on stderr with exit status 2 (1 for divergence and for a failed write) instead of a
    traceback through jsonargparse and Lightning; a run stopped by a signal says where its checkpoint is and exits
    with 128 + the signal number. Set ``EP_LIGHTNING_TRACEBACK=1`` to see the full traceback.
    """
    quiet_lightning()
    _RunFolder.reset()
    given = sys.argv[1:] if args is None else list(args)
    argv = resolve_config_paths(given)
    problem = config_file_errors(argv, [DEFAULTS])
    if problem is not None:
        _say(f"error: {problem}")
        raise SystemExit(2)
    defaults = {"default_config_files": [str(DEFAULTS)]} if DEFAULTS.is_file() else {}
    handlers = _signal_handlers()
    try:
        return EPLightningCLI(
            EnergySystem,
            ImageDataModule,  # any of the package's DataModules (configs/defaults.yaml picks MNIST)
            trainer_class=EPTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            # with subcommands each subcommand's parser reads the defaults; without (run=False) the main parser
            parser_kwargs={name: dict(defaults) for name in SUBCOMMANDS} if run else dict(defaults),
            parser_class=EPArgumentParser,
            args=None if args is None and argv == given else argv,  # (LightningCLI warns when given both)
            run=run,
            auto_configure_optimizers=False,
        )
    except Interrupted as err:
        message = err.summary()
        if err.requeued:
            message += f"; SLURM job requeued, it resumes from {err.requeue_checkpoint}"
        elif err.requeue_checkpoint:
            message += f"; a requeued SLURM job resumes from {err.requeue_checkpoint} (or use --ckpt_path last)"
        elif err.checkpoint:
            message += "; continue with the same command and --ckpt_path last"
        _say(message)
        raise SystemExit(128 + int(err.signum)) from None
    except Exception as err:  # reliability: one clear line for errors written for the user (config_checks.py)
        cause = user_error(err)
        if cause is None or os.environ.get("EP_LIGHTNING_TRACEBACK") == "1":
            raise
        _RunFolder.remove_empty_new()
        _say(f"error: {cause}")
        raise SystemExit(1 if isinstance(cause, (DivergenceError, CheckpointWriteError)) else 2) from cause
    finally:  # Lightning restores the handlers it found (the stop handler) when a stage ends; put back the caller's
        _restore_signal_handlers(handlers)


def _signal_handlers() -> dict[int, Any]:
    return (
        {s: signal.getsignal(s) for s in STOP_SIGNALS} if threading.current_thread() is threading.main_thread() else {}
    )


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


__all__ = ["CONFIGS", "DEFAULTS", "EPLightningCLI", "cli_main", "configure_threads"]
