"""Checkpoints written by ``train.py fit`` (shipped configs, as a user runs them) describe their network and keep the
training epoch's running sums:

- ``EquilibriumModule.load_from_checkpoint(path)`` with nothing but the path rebuilds the system in a fresh Python
  process (a notebook), ``module(x)`` predicts after the evaluation relaxation and ``predict_step`` returns the
  prediction dict; the prediction equals an independent relaxation with the checkpoint's weights; ``hparams.yaml``
  shows the network; ``InitializedEP.load_from_checkpoint(path)`` rebuilds its initializer too;
- an epoch interrupted by SIGTERM and resumed with ``--ckpt_path last`` logs the ``train/acc`` of the uninterrupted
  epoch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.model_summary import ModelSummary
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_user_paths import CONFIGS, REPO, _env, common, interrupt, train

from ep_lightning.checkpoints import EPOCH_SUMS_KEY
from ep_lightning.cli import cli_main
from ep_lightning.data import MNISTDataModule
from ep_lightning.models import EnergyBasedNet, FeedforwardInitializer, PrototypicalNet
from ep_lightning.systems import EquilibriumModule, InitializedEP

pytestmark = pytest.mark.user_paths

#: Training batches of the P-1h runs: the SIGTERM (1 s after fit start) arrives well inside the epoch.
EPOCH_BATCHES = 300


def _p1h(tmp: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "mnist/p1h_ep.yaml"),
        *common(tmp, EPOCH_BATCHES),
        "--test_after_fit",
        "false",
    ]


@pytest.fixture(scope="module")
def p1h_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted P-1h epoch of EPOCH_BATCHES batches; its run folder."""
    tmp = tmp_path_factory.mktemp("p1h")
    run = train(_p1h(tmp), tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "runs/p1h_ep/version_0"


def _mnist_images(n: int) -> torch.Tensor:
    data = MNISTDataModule(data_dir=str(REPO / "data"), test_subset=n)
    data.setup("test")
    return data.test_set.images[:n].flatten(1)


LOAD = """
import json, sys
import torch
from ep_lightning.systems import {cls}

module = {cls}.load_from_checkpoint(sys.argv[1])  # the path only, as in a notebook
x = torch.load(sys.argv[2])
out = module.predict_step((x, torch.zeros(len(x), dtype=torch.long)), 0)
print(json.dumps({{
    "forward": module(x).tolist(),
    "prediction": out["prediction"].tolist(),
    "output": out["output"].tolist(),
    "dtypes": [str(out["prediction"].dtype), str(out["output"].dtype), str(out["label"].dtype)],
    "net": [type(module.net).__name__, module.net.init_args],
    "weights_equal": all(torch.equal(v, torch.load(sys.argv[1], weights_only=False)["state_dict"][k])
                         for k, v in module.state_dict().items()),
}}))
"""


def load_in_fresh_process(cls: str, checkpoint: Path, x: torch.Tensor, tmp: Path, timeout: float = 120) -> dict:
    """Run ``LOAD`` in a new Python process (its own session, killed as a group after ``timeout``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(x, tmp / "x.pt")
    script = tmp / "load.py"
    script.write_text(LOAD.format(cls=cls))
    process = subprocess.Popen(
        [sys.executable, str(script), str(checkpoint), str(tmp / "x.pt")],
        cwd=tmp,
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"loading {checkpoint} did not finish within {timeout} s\n{err[-3000:]}")
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def p1h_by_hand(state_dict: dict[str, torch.Tensor], x: torch.Tensor, steps: int) -> torch.Tensor:
    """P-1h's evaluation relaxation written out (h, o ← σ(W₁x + b₁ + W₂ᵀo), σ(W₂h + b₂), σ(z) = 1/(1 + e^{−4(z−½)}),
    from zero): the output after ``steps`` steps, independent of the systems' and models' code."""
    w1, b1 = state_dict["net.synapses.0.weight"], state_dict["net.synapses.0.bias"]
    w2, b2 = state_dict["net.synapses.1.weight"], state_dict["net.synapses.1.bias"]
    sigma = lambda z: torch.sigmoid(4 * (z - 0.5))
    h, o = torch.zeros(len(x), w1.shape[0]), torch.zeros(len(x), w2.shape[0])
    for _ in range(steps):
        h, o = sigma(x @ w1.T + b1 + o @ w2), sigma(h @ w2.T + b2)
    return o


def test_a_fit_checkpoint_loads_with_its_path_alone_and_predicts(p1h_run: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIGS / "mnist/p1h_ep.yaml").read_text())["model"]
    net_config = config["init_args"]["net"]
    checkpoint = p1h_run / "checkpoints/last.ckpt"
    x = _mnist_images(16)
    got = load_in_fresh_process("EquilibriumModule", checkpoint, x, tmp_path)
    assert got["net"][0] == "PrototypicalNet"
    assert {k: got["net"][1][k] for k in net_config["init_args"]} == net_config["init_args"]
    assert got["weights_equal"]
    assert got["dtypes"] == ["torch.int64", "torch.float32", "torch.int64"]
    assert got["forward"] == got["prediction"], "module(x) predicts after the evaluation relaxation"
    expected = p1h_by_hand(torch.load(checkpoint, weights_only=False)["state_dict"], x, config["init_args"]["T"])
    # float32, 30 steps of the same maths in another operation order (the model folds σ's scale into addmm): 1e-5
    torch.testing.assert_close(torch.tensor(got["output"]), expected, rtol=1e-5, atol=1e-6)
    assert got["prediction"] == expected.argmax(dim=1).tolist()
    saved = torch.load(checkpoint, weights_only=False)
    # the network in the hyperparameters (and hparams.yaml); the CLI's signature key is still written beside them
    assert saved["hyper_parameters"]["net"] == {"class_path": net_config["class_path"], "init_args": got["net"][1]}
    assert yaml.safe_load((p1h_run / "hparams.yaml").read_text())["net"]["class_path"] == net_config["class_path"]
    assert saved["ep_lightning_signature"]["net class"] == net_config["class_path"]


def test_an_initialized_ep_checkpoint_loads_with_its_initializer(tmp_path: Path) -> None:
    """The shipped IEP config through the CLI (in this process; the P-1h test above covers the fresh process):
    ``InitializedEP.load_from_checkpoint(path)`` rebuilds the energy net and the initializer with their arguments and
    weights, and predicts as the trained system does."""
    fit = cli_main(
        ["fit", "--config", str(CONFIGS / "mnist/iep_1h.yaml"), *common(tmp_path, 3), "--test_after_fit", "false"]
    )
    checkpoint = next((tmp_path / "runs/iep_1h/version_0/checkpoints").glob("last.ckpt"))
    loaded = InitializedEP.load_from_checkpoint(checkpoint)
    config = yaml.safe_load((CONFIGS / "mnist/iep_1h.yaml").read_text())["model"]["init_args"]
    assert type(loaded.net) is EnergyBasedNet and type(loaded.initializer) is FeedforwardInitializer
    assert {k: loaded.net.init_args[k] for k in config["net"]["init_args"]} == config["net"]["init_args"]
    assert loaded.initializer.init_args == config["initializer"]["init_args"]
    trained = fit.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    x = _mnist_images(8)
    assert torch.equal(loaded(x), fit.model.cpu()(x))


def test_the_model_summary_shows_the_networks_input_and_state_sizes() -> None:
    """``example_input_array`` (one zero input of the net's declared ``input_shape``) runs ``forward``, which relaxes
    through the network's own module call: the summary lists its input and output sizes instead of '?'."""
    module = EquilibriumModule(PrototypicalNet([784, 32, 10]), T=3, K=1, lrs=[0.1, 0.1])
    summary = ModelSummary(module, max_depth=1)
    net = summary.layer_names.index("net")
    assert summary.in_sizes[net][0] == [1, 784] and summary.in_sizes[net][2] == [[1, 32], [1, 10]]
    assert summary.out_sizes[net] == [1, 10]
    iep = InitializedEP(EnergyBasedNet([784, 12, 10]), FeedforwardInitializer([784, 12, 10]), T=2, K=1, lrs=[0.1, 0.1])
    assert ModelSummary(iep, max_depth=1).out_sizes[ModelSummary(iep, max_depth=1).layer_names.index("net")] == [1, 10]


def test_a_system_built_in_python_describes_its_network_too(tmp_path: Path) -> None:
    """Built in Python (no config): the network (and an optimizer class) are written as config entries, and
    ``load_from_checkpoint(path)`` rebuilds the same system; no nn.Module is pickled into the hyperparameters."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    net = PrototypicalNet([12, 8, 4], activation="tanh", dt=0.5)
    module = EquilibriumModule(net, T=5, K=2, lrs=[0.1, 0.1], nudging="symmetric", optimizer=torch.optim.SGD)
    assert module.hparams["net"] == {
        "class_path": "ep_lightning.models.prototypical.PrototypicalNet",
        "init_args": {"layers": [12, 8, 4], "activation": "tanh", "dt": 0.5, "readout": "mse"},
    }
    assert module.hparams["optimizer"] == "torch.optim.sgd.SGD"
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.rand(8, 12), torch.arange(8) % 4), batch_size=4))
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    loaded = EquilibriumModule.load_from_checkpoint(tmp_path / "python.ckpt")
    assert type(loaded.net) is PrototypicalNet and loaded.net.init_args == net.init_args
    assert loaded.nudging == "symmetric" and loaded.T == 5
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())


def _scalars(run: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_an_epoch_resumed_after_sigterm_logs_the_uninterrupted_training_accuracy(p1h_run: Path, tmp_path: Path) -> None:
    """SIGTERM mid-epoch, then ``--ckpt_path last``: the epoch's ``train/acc`` and ``train/loss`` equal the
    uninterrupted run's (same weights and batches, and the running sums of the batches before the signal come back
    from the checkpoint). Control: the batches after the resume alone have another accuracy."""
    (expected_acc,) = _scalars(p1h_run, "train/acc")
    (expected_loss,) = _scalars(p1h_run, "train/loss")
    run, _ = interrupt(_p1h(tmp_path), tmp_path, signal.SIGTERM, after=1.0)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    step = int(re.search(r"interrupted by SIGTERM at epoch 0, global step (\d+)", run.stderr).group(1))
    assert 0 < step < EPOCH_BATCHES, "the signal must arrive inside the epoch"
    folder = tmp_path / "runs/p1h_ep/version_0"
    sums = torch.load(folder / "checkpoints/last.ckpt", weights_only=False)[EPOCH_SUMS_KEY]
    totals = dict(zip(sums["names"], sums["totals"].tolist()))  # the scalar sums come first
    assert sums["totals"][-1] == 20 * step, "the sums of the batches before the signal, 20 samples each"
    assert _scalars(folder, "train/acc") == [], "the interrupted run ended before the epoch's end"
    resumed = train([*_p1h(tmp_path), "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _scalars(folder, "train/acc") == [expected_acc]  # float32 sums added in the same order: bit for bit
    assert _scalars(folder, "train/loss") == [expected_loss]
    samples = 20 * EPOCH_BATCHES
    after_resume = (expected_acc * samples - totals["acc"]) / (samples - 20 * step)
    assert abs(after_resume - expected_acc) > 1e-4, "control: without the restored sums the epoch mean would differ"
