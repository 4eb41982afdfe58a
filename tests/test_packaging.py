"""``pip install .`` works like the checkout: a wheel built from the repository carries the defaults and every
shipped config, and once installed (not editable) into a fresh virtual environment the ``ep-lightning`` console
script and ``python -m ep_lightning`` train from another folder with the shipped config and
``--data.init_args.data_dir``.

The fresh environment has no network: it reaches torch, Lightning and the other dependencies through a ``.pth``
file naming this interpreter's site-packages, and the wheel is installed with ``--no-deps --no-index``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.user_paths


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        args, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{' '.join(args)} still running after {timeout} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, process.returncode, out, err)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(venv bin folder, environment without the checkout on PYTHONPATH, the wheel)."""
    tmp = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    source = tmp / "source"  # a copy: an in-tree build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "configs", "ep_lightning"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        options = {"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}
        copy(REPO / name, source / name, **options)
    # with setuptools at hand build offline; otherwise pip fetches it into an isolated build environment
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    built = run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *offline, "-q", "-w", str(tmp)], tmp, env
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp.glob("ep_lightning-*.whl")
    venv = tmp / "venv"
    created = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    assert created.returncode == 0, created.stderr[-3000:]
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env)
    # the dependencies of this interpreter, appended after the venv's own site-packages (where the wheel goes)
    (Path(purelib.stdout.strip()) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        tmp,
        env,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv / "bin", env, wheel


def test_wheel_carries_the_defaults_every_config_and_the_entry_points(installed: tuple[Path, dict, Path]) -> None:
    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"ep_lightning/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert "ep_lightning/configs/defaults.yaml" in shipped and shipped <= names, sorted(shipped - names)
    assert "ep_lightning/__main__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ep-lightning = ep_lightning.cli:cli_main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_trains_from_another_folder(installed: tuple[Path, dict, Path], tmp_path: Path) -> None:
    """From an empty folder: the console script resolves the shipped config, loads the packaged defaults (logger,
    checkpointing, monitors, 30 epochs) and trains; ``python -m ep_lightning`` runs the same CLI."""
    bin_dir, env, _ = installed
    where = run([str(bin_dir / "python"), "-c", "import ep_lightning; print(ep_lightning.__file__)"], tmp_path, env)
    assert where.returncode == 0 and "site-packages" in where.stdout and str(REPO) not in where.stdout, where
    common = ["--config", "configs/mnist/p1h_ep.yaml", "--data.init_args.data_dir", str(REPO / "data")]
    printed = run([str(bin_dir / "ep-lightning"), "fit", *common, "--print_config"], tmp_path, env)
    assert printed.returncode == 0, printed.stderr[-3000:]
    config = yaml.safe_load(printed.stdout)
    assert config["trainer"]["max_epochs"] == 30 and config["trainer"]["logger"]["init_args"]["name"] == "p1h_ep"
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "ep_lightning.callbacks.ConvergenceMonitor" in callbacks
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks
    fit = run(
        [str(bin_dir / "python"), "-m", "ep_lightning", "fit", *common, "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "3", "--data.init_args.test_subset", "50"],
        tmp_path,
        env,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "test accuracy" in fit.stdout
    assert (tmp_path / "runs/p1h_ep/version_0/checkpoints/last.ckpt").is_file()
