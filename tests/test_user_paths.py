"""What a new user runs, as they run it: ``train.py`` in a subprocess with the shipped configs, their callbacks,
logger, checkpointing and progress display all on, on small slices of MNIST.

Every process runs in its own session and is killed as a process group at a hard timeout, so a hang (DDP
collectives out of step, an ignored SIGTERM) fails the test instead of stalling the suite.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ep_lightning.config_checks import MAX_RELAXATION_STEPS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
pytestmark = pytest.mark.user_paths


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("EP_LIGHTNING_TRACEBACK", None)
    return env


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def common(tmp: Path, batches: int = 3) -> list[str]:
    """Paths into ``tmp`` (runs/) and the repository (data), a few batches of one epoch, a small test set."""
    return [
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        "--data.init_args.data_dir",
        str(REPO / "data"),
        "--data.init_args.test_subset",
        "100",
        "--trainer.limit_train_batches",
        str(batches),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.max_epochs",
        "1",
    ]


def train(args: list[str], cwd: Path, timeout: float = 240) -> Run:
    """``python train.py ARGS`` with pipes (not a terminal), killed as a group after ``timeout`` seconds."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        out, err = process.communicate()
        pytest.fail(f"train.py {' '.join(args)} still running after {timeout} s (hang)\n{out[-3000:]}\n{err[-3000:]}")
    _kill_group(process)  # DDP children must not outlive the launcher
    return Run(process.returncode, out, err, time.monotonic() - start)


def train_in_terminal(args: list[str], cwd: Path, timeout: float = 240) -> Run:
    """Like :func:`train`, but stdout and stderr are a pseudo-terminal, so the tqdm progress bar is on."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))  # a 160-column terminal
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(),
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.wait()
        reader.join(5)
        os.close(master)
        text = b"".join(chunks).decode(errors="replace")
        pytest.fail(f"train.py {' '.join(args)} still running after {timeout} s (hang)\n{text[-4000:]}")
    _kill_group(process)
    reader.join(10)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    return Run(process.returncode, text, text, time.monotonic() - start)


def run_folders(tmp: Path) -> list[Path]:
    return sorted((tmp / "runs").glob("*/version_*"))


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


# --- DDP: fit then test, every model family ----------------------------------------------------------------------
@pytest.mark.parametrize("config", ["p1h_ep", "eb1h_ep", "pconv_ep", "iep_1h"])
def test_ddp_fit_then_test_with_progress_bar(config: str, tmp_path: Path) -> None:
    """Two gloo processes, the shipped config with its monitors, checkpointing and the tqdm bar (a terminal): the
    first epoch end used to deadlock (rank 0 in the bar's metric reduction, rank 1 in the epoch-mean all-reduce)."""
    run = train_in_terminal(
        [
            "fit",
            "--config",
            str(CONFIGS / "mnist" / f"{config}.yaml"),
            "--config",
            str(CONFIGS / "trainer/ddp.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.limit_test_batches",
            "1",
            *common(tmp_path, batches=2),
        ],
        tmp_path,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert "Epoch 0: 100%" in run.stdout, "the tqdm bar ran"
    # the finished epoch's training means (logged after the bar's own epoch-end hook) reach the bar
    assert re.search(r"Epoch 0: 100%.*train/loss=", run.stdout), run.stdout[-2000:]
    assert re.search(r"test accuracy \d+\.\d\d % \(error \d+\.\d\d %\)", run.stdout), run.stdout[-2000:]
    assert (tmp_path / "runs" / config / "version_0" / "checkpoints" / "last.ckpt").is_file()


# --- SIGTERM / SIGINT --------------------------------------------------------------------------------------------
SIGNAL_BATCHES = 1500  # long enough to be interrupted after start-up, short enough for the reference run


def _p1h(tmp: Path, batches: int = SIGNAL_BATCHES) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "mnist/p1h_ep.yaml"), *common(tmp, batches), "--test_after_fit", "false"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """An uninterrupted P-1h run over SIGNAL_BATCHES batches (the result an interrupted + resumed run must equal)."""
    tmp = tmp_path_factory.mktemp("reference")
    run = train(_p1h(tmp) + ["--test_after_fit", "true"], tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "runs/p1h_ep/version_0/checkpoints/last.ckpt", run


def interrupt(args: list[str], cwd: Path, signum: int, after: float, timeout: float = 240) -> tuple[Run, float]:
    """Start train.py, send ``signum`` to the launching process ``after`` s after training started (the run
    folder's hparams.yaml appears at fit start); returns the run and the seconds from the signal to the exit."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out_err: dict[str, str] = {}
    reader = threading.Thread(target=lambda: out_err.update(zip(("out", "err"), process.communicate())), daemon=True)
    reader.start()
    while not list(cwd.glob("runs/*/version_*/hparams.yaml")):
        if process.poll() is not None or time.monotonic() - start > timeout:
            break
        time.sleep(0.1)
    time.sleep(after)
    sent = time.monotonic()
    process.send_signal(signum)
    reader.join(timeout)
    if reader.is_alive():
        _kill_group(process)
        reader.join(10)
        pytest.fail(f"{signal.Signals(signum).name} did not stop train.py within {timeout} s")
    took = time.monotonic() - sent
    pgid = process.pid
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:  # DDP children follow the launcher
        time.sleep(0.1)
    alive = _group_alive(pgid)
    _kill_group(process)
    assert not alive, "processes of the interrupted run are still alive"
    return Run(process.returncode, out_err.get("out", ""), out_err.get("err", ""), time.monotonic() - start), took


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_within_seconds_and_resume_equals_uninterrupted_run(
    signum: int, reference_run: tuple[Path, Run], tmp_path: Path
) -> None:
    run, took = interrupt(_p1h(tmp_path), tmp_path, signum, after=1.0)
    name = signal.Signals(signum).name
    assert run.returncode == 128 + signum, (run.returncode, run.stderr[-3000:])
    assert took < 15, f"{name}: exit took {took:.1f} s"
    match = re.search(rf"interrupted by {name} at epoch 0, global step (\d+): checkpoint saved to (\S+);", run.stderr)
    assert match, run.stderr[-3000:]
    assert 0 < int(match.group(1)) < SIGNAL_BATCHES, "the signal must arrive during training"
    last = tmp_path / "runs/p1h_ep/version_0/checkpoints/last.ckpt"
    assert Path(match.group(2)) == last and last.is_file()

    resumed = train(_p1h(tmp_path) + ["--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr
    assert run_folders(tmp_path) == [tmp_path / "runs/p1h_ep/version_0"], "continues the same run folder"
    reference, _ = reference_run
    got, expected = final_weights(last), final_weights(reference)
    assert got.keys() == expected.keys()
    for key in expected:  # same batches, same arithmetic, one process: bit-identical
        assert torch.equal(got[key], expected[key]), key


def test_sigterm_under_ddp_stops_and_resumes(tmp_path: Path) -> None:
    """SIGTERM to the launching process of a 2-process run: both ranks stop at the same batch end, last.ckpt is
    written, no process survives; ``--ckpt_path last`` continues from it."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / "mnist/p1h_ep.yaml"),
        "--config",
        str(CONFIGS / "trainer/ddp.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        *common(tmp_path, 400),
        "--test_after_fit",
        "false",
    ]
    run, took = interrupt(args, tmp_path, signal.SIGTERM, after=0.5)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert took < 20, f"exit took {took:.1f} s"
    match = re.search(r"interrupted by SIGTERM at epoch 0, global step (\d+): checkpoint saved", run.stderr)
    assert match and int(match.group(1)) < 400, run.stderr[-3000:]
    resumed = train(args + ["--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    step = torch.load(tmp_path / "runs/p1h_ep/version_0/checkpoints/last.ckpt", weights_only=False)["global_step"]
    assert step == 400


def test_relaxation_stops_on_a_signal_within_a_few_steps() -> None:
    """A relaxation of any length stops within ``CHECK_EVERY`` steps of a stop request (single process)."""
    from ep_lightning.interrupt import CHECK_EVERY, STOP, RelaxationInterrupted
    from ep_lightning.models import PrototypicalNet
    from ep_lightning.relaxation import relax

    net = PrototypicalNet(layers=[4, 3, 2])
    x = torch.rand(2, 4)
    calls = 0
    original = net.step

    def counting_step(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 5:
            STOP.signum, STOP.relaxations = signal.SIGTERM, True
        return original(*args, **kwargs)

    net.step = counting_step
    try:
        with pytest.raises(RelaxationInterrupted):
            relax(net, net.drive(x), net.init_state(x), 10**9)
    finally:
        STOP.signum, STOP.relaxations = None, False
    assert calls <= 5 + CHECK_EVERY


# --- checkpoints -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, fields",
    [("eb1h_ep", ["net class", "net.eps"]), ("p2h_ep", ["net.layers"])],
)
def test_checkpoint_of_another_model_is_refused(
    config: str, fields: list[str], reference_run: tuple[Path, Run], tmp_path: Path
) -> None:
    checkpoint, _ = reference_run
    run = train(
        [
            "test",
            "--config",
            str(CONFIGS / "mnist" / f"{config}.yaml"),
            "--ckpt_path",
            str(checkpoint),
            *common(tmp_path),
        ],
        tmp_path,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {checkpoint} "), run.stderr[-2000:]
    for field in fields:
        assert f"{field}:" in lines[0]
    assert not run_folders(tmp_path)


def test_shipped_config_checkpoints_during_the_epoch() -> None:
    """A kill mid-epoch must not lose the epoch: the default ModelCheckpoint also saves on a timer."""
    import yaml

    defaults = yaml.safe_load((CONFIGS / "defaults.yaml").read_text())
    checkpoints = [c["init_args"] for c in defaults["trainer"]["callbacks"] if c["class_path"].endswith("Checkpoint")]
    assert any(args.get("save_last") is True for args in checkpoints), "last.ckpt at epoch ends"
    assert any(args.get("train_time_interval") or args.get("every_n_train_steps") for args in checkpoints)


# --- data --------------------------------------------------------------------------------------------------------
def test_corrupt_test_file_is_found_before_the_first_training_step(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(REPO / "data", data)
    labels = data / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[5000] ^= 0x01  # one label byte: the archive stays a valid gzip, the content is wrong
    labels.write_bytes(gzip.compress(bytes(raw)))
    run = train(
        [
            "fit",
            "--config",
            str(CONFIGS / "mnist/p1h_ep.yaml"),
            *common(tmp_path),
            "--data.init_args.data_dir",
            str(data),
        ],
        tmp_path,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: checksum mismatch for") and str(labels) in lines[-1]
    assert "epoch 0" not in run.stdout, "no training step may run"
    assert not run_folders(tmp_path)


# --- one-line errors ---------------------------------------------------------------------------------------------
def _bad_yaml(tmp: Path) -> Path:
    path = tmp / "broken.yaml"
    path.write_text("model:\n  init_args:\n    T: [30\n    K: 10\n")
    return path


def _truncated_checkpoint(tmp: Path, source: Path) -> Path:
    path = tmp / "truncated.ckpt"
    path.write_bytes(source.read_bytes()[:4096])
    return path


ERROR_CASES = {
    "negative max_epochs": (lambda tmp, ckpt: ["fit", "--trainer.max_epochs", "-5"], "trainer.max_epochs=-5"),
    "gpu without GPU": (lambda tmp, ckpt: ["fit", "--trainer.accelerator", "gpu"], "trainer.accelerator='gpu'"),
    "missing checkpoint": (lambda tmp, ckpt: ["test", "--ckpt_path", str(tmp / "nowhere.ckpt")], "nowhere.ckpt"),
    "truncated checkpoint": (
        lambda tmp, ckpt: ["test", "--ckpt_path", str(_truncated_checkpoint(tmp, ckpt))],
        "truncated.ckpt",
    ),
    "unwritable runs/": (
        lambda tmp, ckpt: ["fit", "--trainer.logger.init_args.save_dir", str(tmp / "a_file" / "runs")],
        "a_file",
    ),
    "YAML syntax error": (lambda tmp, ckpt: ["fit", "--config", str(_bad_yaml(tmp))], "broken.yaml"),
    "resume without a run": (lambda tmp, ckpt: ["fit", "--ckpt_path", "last"], "no earlier run"),
    "huge T": (lambda tmp, ckpt: ["fit", "--model.init_args.T", "1000000000"], f"exceeds {MAX_RELAXATION_STEPS}"),
    # found after the trainer (and the run folder) exist: the folder must be removed again
    "model does not fit the data": (
        lambda tmp, ckpt: ["fit", "--model.init_args.net.init_args.layers", "[100, 10, 10]"],
        "layers[0]=100",
    ),
}
#: Errors found after Lightning printed its start-up lines (seed, devices): the error is the last line.
AFTER_START = {"model does not fit the data"}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_and_leave_no_run_folder(
    case: str, reference_run: tuple[Path, Run], tmp_path: Path
) -> None:
    if case == "gpu without GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "a_file").write_text("a file where a folder is expected")
    make_args, named = ERROR_CASES[case]
    args = make_args(tmp_path, reference_run[0])
    config = [] if "--config" in args else ["--config", str(CONFIGS / "mnist/p1h_ep.yaml")]
    run = train([args[0], *config, *common(tmp_path), *args[1:]], tmp_path, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    if case in AFTER_START:
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        lines = lines[-1:]
    assert len(lines) == 1, f"{case}: expected one line on stderr, got:\n{run.stderr[-3000:]}"
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    assert not (tmp_path / "runs").exists(), f"{case}: left {sorted((tmp_path / 'runs').rglob('*'))}"


# --- output ------------------------------------------------------------------------------------------------------
def test_output_is_short_and_clean_when_redirected(reference_run: tuple[Path, Run]) -> None:
    """No advertisement, no warnings about Lightning's internals or the absent validation split, no FLOPs column,
    no hp_metric placeholder; one line per epoch and a test summary; a small log."""
    checkpoint, run = reference_run
    text = run.stdout + run.stderr
    assert re.search(r"^test accuracy \d+\.\d\d % \(error \d+\.\d\d %\)$", run.stdout, re.MULTILINE), run.stdout[-2000:]
    assert re.search(r"^epoch 0: train/acc \d+\.\d\d %, train/loss ", run.stdout, re.MULTILINE), run.stdout[-2000:]
    for noise in ("litlogger", "LeafSpec", "Total length of `list`", "FLOPs", "Flops", "it/s]"):
        assert noise not in text, noise
    assert len(text.encode()) < 20_000, f"{len(text.encode())} bytes of output for one short epoch"
    events = list(checkpoint.parents[1].glob("events.out.tfevents.*"))
    assert events and not any(b"hp_metric" in e.read_bytes() for e in events)


def test_fit_ckpt_path_last_after_sigkill_continues_the_latest_run(tmp_path: Path) -> None:
    """SIGKILL (no handler runs) after the first epoch's checkpoint: ``--ckpt_path last`` names the file it resumes
    from, continues in the same run folder and finishes the remaining epochs."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / "mnist/p1h_ep.yaml"),
        *common(tmp_path, 300),
        "--trainer.max_epochs",
        "3",
        "--test_after_fit",
        "false",
    ]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = tmp_path / "runs/p1h_ep/version_0/checkpoints/last.ckpt"
    deadline = time.monotonic() + 180
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_group(process)
    process.wait()
    assert last.is_file(), "no checkpoint after the first epoch"
    epoch = torch.load(last, weights_only=False)["epoch"]
    assert epoch < 2, "the kill must come before the run ends"
    resumed = train(args + ["--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr
    assert run_folders(tmp_path) == [tmp_path / "runs/p1h_ep/version_0"]
    assert torch.load(last, weights_only=False)["global_step"] == 900
