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


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    cluster = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in cluster and not k.startswith("SLURM_")}
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # the checkout first
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("EP_LIGHTNING_TRACEBACK", None)
    env.update(extra or {})
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


def train(args: list[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None) -> Run:
    """``python train.py ARGS`` with pipes (not a terminal), killed as a group after ``timeout`` seconds."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(env),
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


def interrupt(
    args: list[str], cwd: Path, signum: int, after: float, timeout: float = 240, env: dict[str, str] | None = None
) -> tuple[Run, float]:
    """Start train.py, send ``signum`` to the launching process ``after`` s after training started (the run
    folder's hparams.yaml appears at fit start); returns the run and the seconds from the signal to the exit."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=_env(env),
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


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["SIGTERM", "SIGINT", "SIGUSR1"]
)
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
    step = int(match.group(1))  # one epoch: the global step is the number of batches done in it
    assert f"resuming from {last} at epoch 0, batch {step} of {SIGNAL_BATCHES}" in resumed.stderr, resumed.stderr
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


def _misspelt_yaml(tmp: Path) -> Path:
    path = tmp / "misspelt.yaml"
    path.write_text("modle:\n  init_args:\n    T: 3\n")
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
    "test without checkpoint": (lambda tmp, ckpt: ["test"], "test needs trained weights: give --ckpt_path"),
    "validate without checkpoint": (
        lambda tmp, ckpt: ["validate", "--data.init_args.val_size", "100"],
        "--evaluate_untrained true",
    ),
    "validate without validation split": (
        lambda tmp, ckpt: ["validate", "--ckpt_path", str(ckpt)],
        "data.init_args.val_size=0",
    ),
    "misspelt key": (
        lambda tmp, ckpt: ["fit", "--model.init_args.betta", "0.5"],
        "unknown key model.init_args.betta on the command line; closest valid keys: model.init_args.beta (",
    ),
    "misspelt key in a config file": (
        lambda tmp, ckpt: ["fit", "--config", str(_misspelt_yaml(tmp))],
        "unknown key modle.init_args.T in config file",
    ),
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
    for noise in ("litlogger", "LeafSpec", "Total length of `list`", "FLOPs", "Flops", "it/s]", "GPU available"):
        assert noise not in text, noise
    assert "TPU available" not in text and "| Name" not in text, "device lines and the summary table are quiet"
    folder = checkpoint.parents[1]
    assert f"writing to {folder}\n" in run.stderr, "a line names the run folder"
    summary = [line for line in run.stderr.splitlines() if line.startswith("model: ")]
    assert summary == ["model: EquilibriumModule (net PrototypicalNet 407 K): 407 K trainable parameters, 1.6 MB"]
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


def test_tensorboard_hparams_tab_lists_the_settings_and_the_metrics(reference_run: tuple[Path, Run]) -> None:
    """The run's event file declares the HPARAMS entry: the system's, network's and data's settings as they ran, and
    val/test accuracy and loss as its metric columns, whose values are the run's own scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder = reference_run[0].parents[1]
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= metrics
    values = {
        name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        for name, value in start.hparams.items()
    }
    assert values["model/class"] == "EquilibriumModule" and values["model/net/class"] == "PrototypicalNet"
    assert values["model/T"] == 30 and values["model/net/layers"] == "[784, 512, 10]"
    assert values["data/batch_size"] == 20 and values["data/test_subset"] == 100
    assert "test/acc" in events.Tags()["scalars"], "the metric column reads the run's own test/acc scalar"


# --- evaluation of a checkpoint ----------------------------------------------------------------------------------
def _copy_run(reference: Path, tmp: Path) -> Path:
    """A copy of the reference run's folder under ``tmp/runs`` (tests must not change the shared fixture)."""
    source = reference.parents[1]
    target = tmp / "runs" / "p1h_ep" / source.name
    shutil.copytree(source, target)
    return target / "checkpoints" / "last.ckpt"


def _direct_evaluation(checkpoint: Path, eval_steps: int) -> dict[str, torch.Tensor]:
    """The reference network evaluated without the CLI: weights from the file, the first 100 test images, the free
    phase of ``eval_steps`` steps from the initial state (one batch of 100, as the CLI's evaluation batch)."""
    from ep_lightning.data import MNISTDataModule
    from ep_lightning.models import PrototypicalNet
    from ep_lightning.systems import EquilibriumModule

    module = EquilibriumModule(PrototypicalNet([784, 512, 10]), T=30, K=10, beta=0.1, lrs=[0.08, 0.04])
    module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    data = MNISTDataModule(data_dir=str(REPO / "data"), test_subset=100)
    data.setup("test")
    x, labels = data.test_set[:100]
    state = module.free_phase(x, eval_steps)
    output = module.net.output(state)
    return {"prediction": output.argmax(dim=1), "output": output, "label": labels}


def test_test_uses_the_command_line_settings_and_writes_next_to_the_run(
    reference_run: tuple[Path, Run], tmp_path: Path
) -> None:
    """``test --ckpt_path last --model.init_args.eval_steps 1``: the checkpoint's weights with ONE relaxation step
    (the command line wins over the checkpoint's 30), the differing setting named, the result in
    <run>/test/version_0 with a config.yaml that records eval_steps 1, no new training version."""
    last = _copy_run(reference_run[0], tmp_path)
    run = train(
        ["test", "--config", str(CONFIGS / "mnist/p1h_ep.yaml"), *common(tmp_path), "--ckpt_path", "last",
         "--model.init_args.eval_steps", "1"],
        tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"test: checkpoint {last}" in run.stderr
    assert (
        "settings that differ from the checkpoint (the configuration is used): model.eval_steps 1 (checkpoint None)"
        in run.stderr
    )
    folder = last.parents[1] / "test" / "version_0"
    assert f"writing to {folder}" in run.stderr
    assert run_folders(tmp_path) == [last.parents[1]], "an evaluation is not a new training version"
    import yaml

    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["model"]["init_args"]["eval_steps"] == 1 and saved["ckpt_path"] == str(last)
    one_step = _direct_evaluation(last, eval_steps=1)
    expected = 100.0 * float((one_step["prediction"] == one_step["label"]).float().mean())
    assert f"test accuracy {expected:.2f} %" in run.stdout, run.stdout[-2000:]
    trained = _direct_evaluation(last, eval_steps=30)
    assert not torch.equal(one_step["prediction"], trained["prediction"]), "1 step and 30 steps must differ"


def test_predict_writes_a_file_of_predictions(reference_run: tuple[Path, Run], tmp_path: Path) -> None:
    """``predict --ckpt_path last`` writes <run>/predict/version_0/predictions.pt (index, predicted class, outputs,
    labels; ``torch.load`` in one line) and prints its path; the rows equal the network evaluated directly."""
    last = _copy_run(reference_run[0], tmp_path)
    run = train(
        ["predict", "--config", str(CONFIGS / "mnist/p1h_ep.yaml"), *common(tmp_path), "--ckpt_path", "last"],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    path = last.parents[1] / "predict" / "version_0" / "predictions.pt"
    assert f"predictions of 100 samples written to {path} (index, prediction, output, label)" in run.stderr
    written = torch.load(path, weights_only=True)
    direct = _direct_evaluation(last, eval_steps=30)
    assert torch.equal(written["index"], torch.arange(100))
    assert written["prediction"].dtype == torch.int64 and torch.equal(written["prediction"], direct["prediction"])
    assert torch.equal(written["label"], direct["label"])
    # same weights, same batch of 100, same float32 arithmetic on the same CPU: equal (1e-6 leaves room for a
    # different reduction order in a matrix product of another shape, far below the 1e-2 gaps between classes)
    assert torch.allclose(written["output"], direct["output"], atol=1e-6, rtol=0)


def test_unreadable_newest_checkpoint_is_skipped_with_a_notice(reference_run: tuple[Path, Run], tmp_path: Path) -> None:
    """A truncated file that is newer than the intact ones (what a full disk used to leave) is skipped by
    ``--ckpt_path last`` with one notice; the intact last.ckpt is used."""
    last = _copy_run(reference_run[0], tmp_path)
    broken = last.parent / "timed-epoch=0-step=99999.ckpt"
    broken.write_bytes(last.read_bytes()[:200_000])
    run = train(
        ["test", "--config", str(CONFIGS / "mnist/p1h_ep.yaml"), *common(tmp_path), "--ckpt_path", "last"], tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    notices = [line for line in run.stderr.splitlines() if line.startswith("skipping ")]
    assert len(notices) == 1 and str(broken) in notices[0] and "not a readable checkpoint" in notices[0], notices
    assert f"test: checkpoint {last}" in run.stderr


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of 20 batches of P-1h: runs/p1h_ep/version_0 with its checkpoints (copied by the tests that resume)."""
    tmp = tmp_path_factory.mktemp("short")
    run = train(_p1h(tmp, batches=20), tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "runs"


def test_resume_with_other_learning_rates_uses_them(short_run: Path, tmp_path: Path) -> None:
    """``fit --ckpt_path last --model.init_args.lrs '[0, 0]'``: the new learning rates apply from the resumed step
    (Lightning restores the checkpoint's): 20 more batches at lr 0 leave every weight exactly as resumed."""
    shutil.copytree(short_run, tmp_path / "runs")
    last = tmp_path / "runs/p1h_ep/version_0/checkpoints/last.ckpt"
    before = final_weights(last)
    args = _p1h(tmp_path, batches=20) + ["--trainer.max_epochs", "2", "--ckpt_path", "last"]
    run = train([*args, "--model.init_args.lrs", "[0.0, 0.0]"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "model.lrs [0.0, 0.0] (checkpoint [0.08, 0.04])" in run.stderr, run.stderr[-2000:]
    assert f"resuming from {last} at epoch 1, batch 0 of 20" in run.stderr, run.stderr[-2000:]
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 40, "20 more steps were taken"
    assert [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == [0.0, 0.0]
    after = checkpoint["state_dict"]
    for key in before:  # w − 0·∇ = w exactly
        assert torch.equal(after[key], before[key]), key
    import yaml

    assert yaml.safe_load((last.parents[1] / "config.yaml").read_text())["model"]["init_args"]["lrs"] == [0.0, 0.0]


# --- full and read-only disks ------------------------------------------------------------------------------------
def _mount_namespace_works() -> bool:
    """Whether this process may mount a private tmpfs (a user + mount namespace: no effect outside it)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _mount_namespace_works(), reason="cannot mount a private tmpfs here (unshare --user --mount refused)"
)


def in_mount_namespace(script: str, tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the shell ``script`` in a private user + mount namespace (its mounts vanish with it), killed as a group
    at ``timeout``. ``$TRAIN`` is ``python train.py``."""
    env = _env({"TRAIN": f"{sys.executable} {REPO / 'train.py'}"})
    process = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-euc", script],
        cwd=tmp,
        env=env,
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
        pytest.fail(f"still running after {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    _kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@needs_mounts
def test_full_disk_is_one_line_and_keeps_the_checkpoints(short_run: Path, tmp_path: Path) -> None:
    """A run continued on a real tmpfs that fills up at the next checkpoint: one line naming the file, exit 1, no
    traceback; last.ckpt byte-for-byte the one before, no temporary file left; with space again the same command
    continues from it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = " ".join(_p1h(disk, batches=20) + ["--trainer.max_epochs", "2", "--ckpt_path", "last"])
    script = f"""
        mount -t tmpfs -o size=8m tmpfs {disk}
        cp -r {short_run} {disk}/runs
        sha256sum {disk}/runs/p1h_ep/version_0/checkpoints/last.ckpt > {tmp_path}/before.sha
        python3 -c "import os; s = os.statvfs('{disk}'); open('{disk}/ballast', 'wb').write(bytes(s.f_bavail * s.f_frsize - 1_000_000))"
        set +e
        $TRAIN {args} > {tmp_path}/full.out 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc
        set -e
        sha256sum {disk}/runs/p1h_ep/version_0/checkpoints/last.ckpt > {tmp_path}/after.sha
        ls -a {disk}/runs/p1h_ep/version_0/checkpoints > {tmp_path}/full.ls
        rm {disk}/ballast
        $TRAIN {args} > {tmp_path}/again.out 2> {tmp_path}/again.err
        cp {disk}/runs/p1h_ep/version_0/checkpoints/last.ckpt {tmp_path}/final.ckpt
    """  # noqa: E501
    done = in_mount_namespace(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot write checkpoint ") and "No space left on device" in last_line, err
    assert str(disk / "runs/p1h_ep/version_0/checkpoints") in last_line
    assert (tmp_path / "before.sha").read_text().split()[0] == (tmp_path / "after.sha").read_text().split()[0]
    assert not [n for n in (tmp_path / "full.ls").read_text().split() if n.endswith(".tmp")]
    assert torch.load(tmp_path / "final.ckpt", weights_only=False)["global_step"] == 40


@needs_mounts
def test_read_only_run_folder_is_one_line_at_start(short_run: Path, tmp_path: Path) -> None:
    """runs/p1h_ep read-only (runs/ itself writable): a new run and a resumed one each stop at start with one line
    naming the folder; nothing in it changes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    fresh = " ".join(_p1h(disk, batches=20))
    resume = f"{fresh} --ckpt_path last"
    script = f"""
        mount -t tmpfs -o size=16m tmpfs {disk}
        cp -r {short_run} {disk}/runs
        mount --bind {disk}/runs/p1h_ep {disk}/runs/p1h_ep
        mount -o remount,bind,ro {disk}/runs/p1h_ep
        find {disk}/runs | sort > {tmp_path}/before.ls
        set +e
        $TRAIN {fresh} > /dev/null 2> {tmp_path}/fresh.err; echo $? > {tmp_path}/fresh.rc
        $TRAIN {resume} > /dev/null 2> {tmp_path}/resume.err; echo $? > {tmp_path}/resume.rc
        set -e
        find {disk}/runs | sort > {tmp_path}/after.ls
    """
    done = in_mount_namespace(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in ("fresh", "resume"):
        err = (tmp_path / f"{case}.err").read_text().strip().splitlines()
        assert (tmp_path / f"{case}.rc").read_text().strip() == "2", err
        assert len(err) == 1 and err[0].startswith("error: ") and "not writable" in err[0], (case, err)
        assert str(disk / "runs/p1h_ep") in err[0], err
    assert (tmp_path / "before.ls").read_text() == (tmp_path / "after.ls").read_text()


# --- clusters: SLURM requeue and several nodes -------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_slurm_signal_requeues_and_the_requeued_job_resumes(
    signum: int, reference_run: tuple[Path, Run], tmp_path: Path
) -> None:
    """Under SLURM (its environment variables, a fake ``scontrol`` on PATH). SIGUSR1 before the time limit: the run
    stops with last.ckpt, Lightning's requeue path writes hpc_ckpt_1.ckpt and calls ``scontrol requeue <job>``.
    SIGTERM (a preemption, which SLURM requeues itself): the same file, no scontrol call. The requeued job (the same
    command, no --ckpt_path) resumes from that file into the same run folder, removes it when it finishes, and ends
    with the weights of the uninterrupted run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ep_lightning_test",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    run, took = interrupt(_p1h(tmp_path), tmp_path, signum, after=1.0, env=slurm)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert run.returncode == 128 + signum, run.stderr[-3000:]
    assert took < 15, f"exit took {took:.1f} s"
    if signum == signal.SIGUSR1:
        assert f"; SLURM job requeued, it resumes from {hpc}" in run.stderr, run.stderr[-3000:]
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    else:
        assert f"; a requeued SLURM job resumes from {hpc}" in run.stderr, run.stderr[-3000:]
        assert not (tmp_path / "scontrol.log").exists(), "SLURM requeues a preempted job itself"
    step = torch.load(hpc, weights_only=False)["global_step"]
    assert 0 < step < SIGNAL_BATCHES

    requeued = train(_p1h(tmp_path), tmp_path, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {hpc} at epoch 0, batch {step} of {SIGNAL_BATCHES}" in requeued.stderr
    assert run_folders(tmp_path) == [tmp_path / "runs/p1h_ep/version_0"], "the requeued job continues the run folder"
    assert not hpc.exists(), "a finished run removes the requeue checkpoint"
    got = final_weights(tmp_path / "runs/p1h_ep/version_0/checkpoints/last.ckpt")
    expected = final_weights(reference_run[0])
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _two_nodes(args: list[str], cwd: Path, timeout: float = 300) -> list[Run]:
    """``args`` started twice, as two "nodes" of one process each on 127.0.0.1 (NODE_RANK 0 and 1, the same
    MASTER_ADDR/MASTER_PORT: how torchrun and SLURM launch train.py on each machine)."""
    port = str(_free_port())
    processes = []
    for node in (0, 1):
        env = _env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node)})
        processes.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), *args],
                cwd=cwd,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        )
    runs = []
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in processes:
                _kill_group(p)
            pytest.fail(f"two-node run still running after {timeout} s")
        runs.append(Run(process.returncode, out, err, 0.0))
    for process in processes:
        _kill_group(process)
    return runs


def test_two_nodes_with_a_resume_equal_the_two_process_run(tmp_path: Path) -> None:
    """2 "nodes" × 1 process (``--trainer.num_nodes 2``, NODE_RANK, MASTER_ADDR/PORT) train one epoch, then
    continue with ``--ckpt_path last`` for a second: the weights equal those of one 2-process run of two epochs
    (same shards, same all-reduced gradients, resumed at an epoch boundary)."""
    base = [
        "fit",
        "--config",
        str(CONFIGS / "mnist/p1h_ep.yaml"),
        "--config",
        str(CONFIGS / "trainer/ddp.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--data.init_args.batch_size",
        "10",
        *common(tmp_path / "nodes", batches=8),
        "--test_after_fit",
        "false",
    ]
    reference = train(
        [*base, "--trainer.devices", "2", "--trainer.max_epochs", "2", "--trainer.logger.init_args.save_dir",
         str(tmp_path / "reference")],
        tmp_path,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-3000:]
    nodes = [*base, "--trainer.devices", "1", "--trainer.num_nodes", "2"]
    first = _two_nodes([*nodes, "--trainer.max_epochs", "1"], tmp_path)
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    second = _two_nodes([*nodes, "--trainer.max_epochs", "2", "--ckpt_path", "last"], tmp_path)
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-3000:] + second[1].stderr[-3000:]
    last = tmp_path / "nodes/runs/p1h_ep/version_0/checkpoints/last.ckpt"
    assert f"resuming from {last} at epoch 1, batch 0 of 8" in second[0].stderr, second[0].stderr[-2000:]
    assert run_folders(tmp_path / "nodes") == [tmp_path / "nodes/runs/p1h_ep/version_0"]
    got = torch.load(last, weights_only=False)
    expected = torch.load(tmp_path / "reference/p1h_ep/version_0/checkpoints/last.ckpt", weights_only=False)
    assert got["global_step"] == expected["global_step"] == 16
    for key in expected["state_dict"]:  # gloo sums the same two gradients in the same order: bit-identical
        assert torch.equal(got["state_dict"][key], expected["state_dict"][key]), key
