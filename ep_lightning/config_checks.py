"""Start-up checks that reject a wrong configuration before any training step, and the CLI's clean error report.

Every check raises :class:`ConfigError` (a ``ValueError``) with one message naming the field, the value and what is
allowed. :func:`user_error` finds such an error inside the exception chain that LightningCLI/jsonargparse wrap
around it, so ``train.py`` can print one line instead of a 40-line traceback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from ep_lightning.errors import CheckpointWriteError, ConfigError, DataFileError, DivergenceError
from ep_lightning.models.base import EnergyModel

#: Folder of this package: a ValueError raised by code in here is a message written for the user.
_PACKAGE_DIR = Path(__file__).resolve().parent


def model_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """Per-sample input shape the network declares (``EnergyModel.input_shape``): ``(n_in,)`` for layered nets (any
    input flattened to n_in values), ``(C, H, W)`` for convolutional ones; ``None`` for other modules."""
    return tuple(model.input_shape) if isinstance(model, EnergyModel) else None


def _prod(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 0


def check_model_fits_data(model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise a ConfigError if the network's input size or output size does not match the data.

    Layered nets flatten the image, so their first layer must have C·H·W units; conv nets need (C, H, W) exactly;
    the output layer needs one unit per class.
    """
    expected = model_input_shape(model)
    data_desc = "×".join(map(str, input_shape)) + f" = {_prod(tuple(input_shape))} values"
    name = type(model).__name__
    if expected is not None:
        if len(expected) == 1 and expected[0] != _prod(tuple(input_shape)):
            raise ConfigError(
                f"{name} layers[0]={expected[0]} (model.init_args.net.init_args.layers) does not match the data: "
                f"each image is {data_desc}; the input layer must have {_prod(tuple(input_shape))} units"
            )
        if len(expected) == 3 and tuple(expected) != tuple(input_shape):
            raise ConfigError(
                f"{name} expects inputs of input_channels×input_size×input_size = {'×'.join(map(str, expected))} "
                f"(model.init_args.net.init_args.input_channels / input_size) but each image is {data_desc}; "
                f"set input_channels={input_shape[0]} and input_size={input_shape[-1]}"
            )
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and int(model_classes) != int(num_classes):
        field = "num_classes" if hasattr(model, "input_channels") else "layers[-1]"
        raise ConfigError(
            f"{name} {field}={model_classes} (the output layer) does not match the data, which has {num_classes} "
            f"classes (labels 0…{num_classes - 1}); the output layer must have {num_classes} units"
        )


def check_module_fits_datamodule(module: Any) -> None:
    """Lightning ``setup`` helper: compare ``module.net`` with ``trainer.datamodule.input_shape``/``num_classes``.

    Does nothing without a trainer, a datamodule or those attributes (e.g. plain dataloaders passed to ``fit``).
    """
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    input_shape = getattr(datamodule, "input_shape", None)
    num_classes = getattr(datamodule, "num_classes", None)
    if input_shape is None or num_classes is None:
        return
    check_model_fits_data(module.net, tuple(input_shape), int(num_classes))


def _raised_in_package(err: BaseException) -> bool:
    """True if the innermost frame of ``err``'s traceback lies in ep_lightning (our own message, not torch's)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def user_error(err: BaseException) -> BaseException | None:
    """The exception in ``err``'s chain (``__cause__``/``__context__``) that was written for the user, if any.

    That is a :class:`ConfigError`, a data-file, divergence or checkpoint-write error, or a ``ValueError`` raised by
    ep_lightning code (the checks in ``__init__`` methods). Errors from deep inside torch or Lightning are not
    (their traceback is what a developer needs), so this returns ``None`` for them.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConfigError, DataFileError, DivergenceError, CheckpointWriteError)):
            return current
        if type(current) is ValueError and _raised_in_package(current):
            return current
        current = current.__cause__ or current.__context__
    return None


# --- command-line level checks (ep_lightning.cli) ---------------------------------------------------------------
#: Largest number of relaxation steps accepted for T, K, eval_steps, … (the papers use at most 500): time and the
#: monitors' traces grow linearly with the steps, and a mistyped value would otherwise run for days.
MAX_RELAXATION_STEPS = 10_000
_STEP_FIELDS = ("T", "K", "eval_steps", "bptt_steps")


def check_relaxation_steps(model_config: dict[str, Any]) -> None:
    """ConfigError if a relaxation-step count of the model exceeds :data:`MAX_RELAXATION_STEPS`."""
    init_args = model_config.get("init_args") or {}
    for field in _STEP_FIELDS:
        value = init_args.get(field)
        if isinstance(value, int) and value > MAX_RELAXATION_STEPS:
            raise ConfigError(
                f"model.init_args.{field}={value} exceeds {MAX_RELAXATION_STEPS} relaxation steps (the papers use at "
                f"most 500; time and monitor memory grow with the steps); use a value ≤ {MAX_RELAXATION_STEPS}"
            )


def check_trainer_settings(trainer: dict[str, Any]) -> None:
    """ConfigError for trainer values Lightning would reject with a traceback (epochs, accelerator)."""
    for field in ("max_epochs", "min_epochs"):
        value = trainer.get(field)
        if isinstance(value, int) and value < -1:
            raise ConfigError(
                f"trainer.{field}={value} is invalid: use a number of epochs ≥ 0 (or -1 for no limit on max_epochs)"
            )
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator!r} but this machine has no usable CUDA GPU; use "
                f"--trainer.accelerator cpu (or auto)"
            )
    if accelerator == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator='mps' but MPS is not available here; use --trainer.accelerator cpu")


#: Keys of the systems that were renamed: old name → (new name, example).
RENAMED_SYSTEM_KEYS = {
    "model": ("net", "the inner network: model.init_args.net, e.g. --model.net.init_args.layers"),
    "T_minus": ("T", "model.init_args.T"),
    "T_plus": ("K", "model.init_args.K"),
    "random_sign": ("nudging", "nudging: random_sign (or one_sided)"),
    "seed": ("sign_seed", "model.init_args.sign_seed"),
}


def renamed_key(parts: list[str]) -> str | None:
    """What to write instead when a dotted key (``model.init_args.model.…``, ``model.model.…``) uses a renamed system
    key; None otherwise."""
    if not parts or parts[0] != "model":
        return None
    rest = parts[2:] if len(parts) > 2 and parts[1] == "init_args" else parts[1:]
    if not rest or rest[0] not in RENAMED_SYSTEM_KEYS:
        return None
    new, example = RENAMED_SYSTEM_KEYS[rest[0]]
    return f"'{rest[0]}' is now '{new}' ({example})"


def config_file_errors(argv: list[str], defaults: list[Path]) -> str | None:
    """One line for the first config file (``--config X`` in ``argv``, or a default file) that is missing or not
    valid YAML (naming the file, the line and column), or for a renamed system key in ``argv`` or a config file;
    None if all is well."""
    import yaml

    files = [p for p in defaults if p.is_file()]
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    for arg in argv:
        old = renamed_key(arg.lstrip("-").split("=", 1)[0].split("."))
        if old is not None and arg.startswith("--"):
            return f"{arg.split('=', 1)[0]} uses a renamed key: {old}"
    for path in files:
        if not path.is_file():
            return f"config file {path} does not exist; check the path given to --config"
        try:
            loaded = yaml.safe_load(path.read_text())
            system = ((loaded or {}).get("model") or {}) if isinstance(loaded, dict) else {}
            for key in list((system.get("init_args") or {}) if isinstance(system, dict) else {}):
                old = renamed_key(["model", "init_args", key])
                if old is not None:
                    return f"config file {path} uses a renamed key: {old}"
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"config file {path} is not valid YAML{where}: {problem}; fix the file"
        except OSError as err:
            return f"config file {path} cannot be read ({err.strerror}); check its permissions"
    return None


# --- parse errors (jsonargparse) --------------------------------------------------------------------------------
def _class_arguments(class_path: str) -> list[str]:
    """Names of the constructor arguments of ``class_path`` (through ``**kwargs`` to the parents' constructors)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            break
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def _option_names(parser: Any) -> list[str]:
    """Every ``--option`` a (jsonargparse) parser accepts."""
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _where(key: str, argv: list[str]) -> str:
    """Where the user wrote ``key`` (its last dotted part): on the command line or in which --config file."""
    import re

    last = key.rsplit(".", 1)[-1]  # (a config file nests the key: only its last part appears on one line)
    for arg in argv:
        if arg.startswith("--") and re.search(rf"(^|\.){re.escape(last)}($|[.=+])", arg[2:]):
            return "on the command line"
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in files:
        try:
            if re.search(rf"^\s*{re.escape(last)}\s*:", Path(name).read_text(), re.MULTILINE):
                return f"in config file {name}"
        except OSError:
            continue
    return "in the configuration"


def _closest(word: str, valid: list[str], join: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(word, valid, n=3, cutoff=0.6) or difflib.get_close_matches(word, valid, n=3)
    return ", ".join(f"{join}{name}" for name in close) if close else ", ".join(f"{join}{name}" for name in valid)


def parse_error_line(message: str, parser: Any, argv: list[str]) -> str:
    """One line for a jsonargparse error ``message`` (of ``parser``, the subcommand's parser): for an unknown key
    the full key, where it was written and the closest valid keys; any other message joined onto one line."""
    import re

    prog = str(getattr(parser, "prog", "train.py")).replace(" [options]", "")
    option = re.search(r"Options? '([^']+)'(?: is| are) not accepted", message)
    if option:  # an argument of a class (system, network, data module, logger, callback)
        before = message[: option.start()]
        keys = re.findall(r'Parser key "([^"]+)"', before)
        classes = re.findall(r"Problem with given class_path '([^']+)'", before)
        name = option.group(1)
        full = ".init_args.".join([*keys, name]) if keys else name
        valid = _class_arguments(classes[-1]) if classes else []
        short = classes[-1].rsplit(".", 1)[-1] if classes else "this class"
        prefix = full[: len(full) - len(name)]
        closest = f"; closest valid keys: {_closest(name, valid, prefix)}" if valid else ""
        help_key = ".init_args.".join(keys) if keys else "model"
        return f"unknown key {full} {_where(full, argv)}{closest} (all of {short}'s: {prog} --{help_key}.help {short})"
    subkey = re.search(r"(?:Subcommand '[^']+'|Group '([^']+)') does not accept option '([^']+)'", message)
    if subkey:  # a key of the config that no option holds (e.g. `modle:` or `trainer: {max_epoks: …}`)
        full = ".".join(part for part in subkey.groups() if part)
        parts = full.split(".")
        names = [a.dest for a in parser._actions if a.dest not in ("help", "==SUPPRESS==")]
        depth = 0  # the longest prefix of the key that names a group of options
        while depth < len(parts) - 1 and any(d.startswith(".".join(parts[: depth + 1]) + ".") for d in names):
            depth += 1
        prefix = ".".join(parts[:depth])
        valid = sorted({d[len(prefix) + 1 if prefix else 0 :].split(".", 1)[0] for d in names if d.startswith(prefix)})
        closest = _closest(parts[depth], valid, f"{prefix}." if prefix else "")
        return f"unknown key {full} {_where(parts[depth], argv)}; closest valid keys: {closest} ({prog} --help)"
    if re.search(r"arguments are required: \w+\.model\b", message):
        return (
            "no model configured: give --config <experiment>.yaml (e.g. configs/mnist/p1h_ep.yaml; a run folder's "
            "config.yaml is the configuration it was trained with)"
        )
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        option_name = unknown.group(1).split("=", 1)[0]
        valid = _option_names(parser)
        return f"unknown option {option_name}; closest valid options: {_closest(option_name, valid)} ({prog} --help)"
    return " ".join(message.split())
