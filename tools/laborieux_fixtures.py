"""Record the computation of Laborieux et al.'s own code (github.com/Laborieux-Axel/Equilibrium-Propagation,
``model_utils.py``: ``P_CNN``) as fixtures for ``tests/test_parity_laborieux.py``.

    python tools/laborieux_fixtures.py /path/to/Equilibrium-Propagation [--commit HASH] [--out tests/fixtures]

Their ``P_CNN`` runs on CPU in float64 on seeded weights (``seeded_parameters``: U(±1/√fan_in), PyTorch's default
range; the fixture stores the seed and a SHA-256 of every tensor, so the test regenerates and checks them) and on
synthetic, seeded CIFAR-shaped inputs (3×32×32 uniform pixels normalised with their CIFAR-10 mean and 3·std; one
MNIST-shaped 1×28×28 case), for the cases in ``CASES``: a reduced-width copy of their README's CIFAR-10 VGG with the
softmax read-out (cross-entropy) and with the squared-error output, a net with average / no pooling, a strided
convolution and a hidden fc layer, and a 1-channel net. Each case follows their ``train`` function step by step:

- ``free``: T1 free steps from ``init_neurons`` (their first phase);
- ``nudged_plus`` / ``nudged_minus``: T2 steps at +β / −β, each from the free state (``--thirdphase``);
- ``ep_update_symmetric``: ``compute_syn_grads(s^{+β}, s^{−β}, (β, −β))``, the gradient their optimizer applies;
- ``ep_update_one_sided``: ``compute_syn_grads(s*, s^{+β}, (0, β))`` (no ``--thirdphase``);
- ``bptt_grad``: their ``alg='BPTT'`` step: T1 − T2 steps, then T2 steps with graph, loss mean ℓ(s, y) backward.

States are in our layer order, which is theirs (input → output), parameters under this repository's names
(``convs.i``, ``fc_hidden.j``, ``fc``; their ``synapses`` in order). Large tensors are stored as sketches of a
matrix view (``record``: ``tools/parity_fixtures.py``'s ``sketch`` of the tensor as (batch·channels) × (rest)), so
the files stay small.

Their loss terms cast to float32 (``.float()`` in ``P_CNN.Phi``); during the recording ``Tensor.float`` converts to
float64 instead, so that the fixtures hold their algorithm at float64 round-off (``--keep-float32-casts`` records
with the casts as they are, to measure what they change). None of their code is copied: ``model_utils`` is imported
from the given checkout, with a bare stand-in module for ``torchvision`` (imported there but not used by ``P_CNN``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
AUTHORS_REPO = "https://github.com/Laborieux-Axel/Equilibrium-Propagation"
BATCH = 8
WEIGHT_SEED = 2021
INPUT_SEED = 5
#: Their CIFAR-10 normalisation (main.py): mean and 3 × std per channel.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (3 * 0.2023, 3 * 0.1994, 3 * 0.2010)

#: Activation names of their ``main.py --act`` → ours (``ep_lightning/models/activations.py``).
ACTIVATIONS = {
    "my_hard_sig": "half_slope_hard_sigmoid",
    "hard_sigmoid": "hard_sigmoid",
    "ctrd_hard_sig": "centered_hard_sigmoid",
    "mysig": "sigmoid",
    "sigmoid": "logistic",
    "tanh": "tanh",
}

#: Their command-line arguments per case (``channels`` with the input's first, as their P_CNN takes it; ``fc`` ends
#: with the output layer) and T1, T2, β. The VGG cases keep their README's T2 and β (CE: 25 and 1; MSE: 30 and 0.5)
#: with T1 = 100 instead of 250, to keep the float64 test short: the comparison is of the same steps either way.
CASES: dict[str, dict[str, Any]] = {
    "vgg_ce": {
        "in_size": 32,
        "channels": [3, 8, 16, 16, 16],
        "kernels": [3, 3, 3, 3],
        "strides": [1, 1, 1, 1],
        "paddings": [1, 1, 1, 0],
        "pools": "mmmm",
        "fc": [10],
        "act": "my_hard_sig",
        "loss": "cel",
        "softmax": True,
        "T1": 100,
        "T2": 25,
        "beta": 1.0,
    },
    "vgg_mse": {
        "in_size": 32,
        "channels": [3, 8, 16, 16, 16],
        "kernels": [3, 3, 3, 3],
        "strides": [1, 1, 1, 1],
        "paddings": [1, 1, 1, 0],
        "pools": "mmmm",
        "fc": [10],
        "act": "my_hard_sig",
        "loss": "mse",
        "softmax": False,
        "T1": 100,
        "T2": 30,
        "beta": 0.5,
    },
    "pools_strides_fc": {
        "in_size": 32,
        "channels": [3, 8, 12, 12],
        "kernels": [3, 3, 2],
        "strides": [1, 2, 1],
        "paddings": [1, 1, 0],
        "pools": "mai",
        "fc": [16, 10],
        "act": "hard_sigmoid",
        "loss": "cel",
        "softmax": True,
        "T1": 100,
        "T2": 20,
        "beta": 0.5,
    },
    "mnist_shaped": {
        "in_size": 28,
        "channels": [1, 6, 8],
        "kernels": [5, 3],
        "strides": [1, 1],
        "paddings": [0, 1],
        "pools": "mi",
        "fc": [10],
        "act": "mysig",
        "loss": "mse",
        "softmax": False,
        "T1": 60,
        "T2": 15,
        "beta": 0.2,
    },
}


def _load_parity_tool() -> types.ModuleType:
    """tools/parity_fixtures.py (its ``record``, ``sketch`` and ``digest``)."""
    spec = importlib.util.spec_from_file_location("parity_fixtures", Path(__file__).with_name("parity_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


parity_tool = _load_parity_tool()


# --- shared with tests/test_parity_laborieux.py ------------------------------------------------------------------
def our_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    """``ConvPrototypicalNet`` arguments for a case: their geometry, and their conventions (the nudge inside σ for
    the squared error; the read-out learned at the nudged states for the softmax read-out)."""
    kwargs: dict[str, Any] = {
        "input_size": case["in_size"],
        "input_channels": case["channels"][0],
        "channels": case["channels"][1:],
        "kernel_size": case["kernels"],
        "stride": case["strides"],
        "padding": case["paddings"],
        "pools": case["pools"],
        "fc_hidden": case["fc"][:-1],
        "num_classes": case["fc"][-1],
        "activation": ACTIVATIONS[case["act"]],
    }
    if case["softmax"]:
        kwargs.update(readout="ce", readout_gradient="nudged")
    else:
        kwargs.update(nudge_inside=True)
    return kwargs


def parameter_shapes(case: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of our network, in ``named_parameters`` order (= their ``synapses`` order)."""
    from ep_lightning.models import ConvPrototypicalNet

    net = ConvPrototypicalNet(**our_kwargs(case))
    return [(name, tuple(p.shape)) for name, p in net.named_parameters()]


def seeded_parameters(case: dict[str, Any], seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """float64 weights and biases ~ U(±1/√fan_in), drawn in order from one generator."""
    generator = torch.Generator().manual_seed(seed)
    params, fan_in = {}, 1
    for name, shape in parameter_shapes(case):
        if name.endswith("weight"):
            fan_in = int(torch.tensor(shape[1:]).prod())
        params[name] = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * fan_in**-0.5
    return params


def synthetic_batch(case: dict[str, Any], seed: int = INPUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``BATCH`` seeded images (uniform pixels; 3 channels normalised like their CIFAR-10 loader) and labels."""
    generator = torch.Generator().manual_seed(seed)
    c, side = case["channels"][0], case["in_size"]
    x = torch.rand(BATCH, c, side, side, generator=generator, dtype=torch.float64)
    if c == 3:
        mean = torch.tensor(CIFAR_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD, dtype=torch.float64).view(1, 3, 1, 1)
        x = (x - mean) / std
    labels = torch.randint(0, case["fc"][-1], (BATCH,), generator=generator)
    return x, labels


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor as a matrix for sketching: rows = its first two dims for ≥ 3-d tensors (batch·channels, or
    out·in channels of a kernel), its first dim otherwise."""
    t = t.detach().to(torch.float64)
    return t.reshape(t.shape[0] * t.shape[1], -1) if t.dim() >= 3 else t.reshape(t.shape[0], -1)


def record(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as stored in a fixture: in full if small, else the sketch of its ``matrix_view``."""
    t = t.detach().to(torch.float64).clone()
    if t.numel() <= parity_tool.FULL_LIMIT:
        return {"full": t}
    return {"sketch": parity_tool.sketch(matrix_view(t)), "shape": tuple(t.shape)}


def relative_error(got: torch.Tensor, stored: dict[str, Any]) -> float:
    """‖got − theirs‖/‖theirs‖ for a tensor stored in full; for a sketched one, the largest such ratio over the
    sketch's parts (projections from both sides, sampled entries, norm): the same order as the full tensors' ratio."""
    got = got.detach().to(torch.float64)
    if "full" in stored:
        want = stored["full"]
        assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
        return float((got - want).norm() / want.norm()) if want.norm() > 0 else float(got.norm())
    assert tuple(got.shape) == tuple(stored["shape"]), (tuple(got.shape), stored["shape"])
    mine = parity_tool.sketch(matrix_view(got))
    return max(float((mine[part] - want).norm() / want.norm()) for part, want in stored["sketch"].items())


# --- their code ----------------------------------------------------------------------------------------------------
def import_theirs(checkout: Path) -> types.ModuleType:
    """``model_utils`` from the checkout; ``torchvision`` (imported at its top, unused by ``P_CNN``) is a stand-in."""
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return importlib.import_module("model_utils")


@contextlib.contextmanager
def float64_casts(enabled: bool) -> Iterator[None]:
    """While active, ``Tensor.float()`` converts to float64 (their loss terms call it), unless not ``enabled``."""
    original = torch.Tensor.float
    if enabled:
        torch.Tensor.float = lambda self, *args, **kwargs: self.to(torch.float64)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.float = original  # type: ignore[method-assign]


def their_activation(module: types.ModuleType, name: str) -> Any:
    """The function their ``main.py`` maps ``--act name`` to."""
    return {
        "my_hard_sig": module.my_hard_sig,
        "hard_sigmoid": module.hard_sigmoid,
        "ctrd_hard_sig": module.ctrd_hard_sig,
        "mysig": module.my_sigmoid,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }[name]


def run_theirs(checkout: Path, case: dict[str, Any], keep_float32_casts: bool = False) -> dict[str, Any]:
    """Free and nudged states, EP updates and BPTT gradient of their ``P_CNN`` (our layer order and names)."""
    torch.set_default_dtype(torch.float64)
    try:
        with float64_casts(not keep_float32_casts):
            return _run_theirs(import_theirs(checkout), case)
    finally:
        torch.set_default_dtype(torch.float32)


def _run_theirs(mu: types.ModuleType, case: dict[str, Any]) -> dict[str, Any]:
    model = mu.P_CNN(
        case["in_size"],
        case["channels"],
        case["kernels"],
        case["strides"],
        case["fc"],
        mu.make_pools(case["pools"]),
        case["paddings"],
        activation=their_activation(mu, case["act"]),
        softmax=case["softmax"],
    ).double()
    names = [name for name, _ in parameter_shapes(case)]
    theirs = list(model.parameters())
    assert len(theirs) == len(names), "parameter count differs from their synapses"
    params = seeded_parameters(case)
    with torch.no_grad():
        for name, p in zip(names, theirs):
            assert tuple(p.shape) == tuple(params[name].shape), name
            p.copy_(params[name])
    if case["loss"] == "mse":
        criterion = torch.nn.MSELoss(reduction="none")
    else:
        criterion = torch.nn.CrossEntropyLoss(reduction="none")
    x, y = synthetic_batch(case)
    T1, T2, beta = case["T1"], case["T2"], case["beta"]

    def grads() -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in zip(names, theirs)}

    # EP, as their train(alg='EP', thirdphase=True): first phase, second at +β, third at −β from the first's state
    neurons = model.init_neurons(BATCH, x.device)
    neurons = model(x, y, neurons, T1, beta=0.0, criterion=criterion)
    neurons_1 = mu.copy(neurons)
    neurons = model(x, y, neurons, T2, beta=beta, criterion=criterion)
    neurons_2 = mu.copy(neurons)
    neurons = mu.copy(neurons_1)
    neurons = model(x, y, neurons, T2, beta=-beta, criterion=criterion)
    neurons_3 = mu.copy(neurons)
    model.compute_syn_grads(x, y, neurons_2, neurons_3, (beta, -beta), criterion)
    symmetric = grads()
    model.compute_syn_grads(x, y, neurons_1, neurons_2, (0.0, beta), criterion)
    one_sided = grads()

    # BPTT, as their train(alg='BPTT'): T1 − T2 steps, detach, T2 steps with graph, mean loss, backward
    neurons = model.init_neurons(BATCH, x.device)
    neurons = model(x, y, neurons, T1 - T2, beta=0.0, criterion=criterion)
    x_leaf = x.detach().requires_grad_(True)
    neurons = [n.detach().requires_grad_(True) for n in neurons]
    neurons = model(x_leaf, y, neurons, T2, beta=0.0, criterion=criterion, check_thm=True)
    if case["loss"] == "mse":
        onehot = torch.nn.functional.one_hot(y, num_classes=model.nc)
        loss = 0.5 * criterion(neurons[-1].float(), onehot.float()).sum(dim=1).mean().squeeze()
    else:
        logits = model.synapses[-1](neurons[-1].view(BATCH, -1)) if case["softmax"] else neurons[-1]
        loss = criterion(logits.float(), y).mean().squeeze()
    model.zero_grad()
    loss.backward()
    bptt = grads()

    def states(ns: list[torch.Tensor]) -> list[torch.Tensor]:
        return [n.detach().clone() for n in ns]

    return {
        "free": states(neurons_1),
        "nudged_plus": states(neurons_2),
        "nudged_minus": states(neurons_3),
        "ep_update_symmetric": symmetric,
        "ep_update_one_sided": one_sided,
        "bptt_grad": bptt,
    }


def authors_commit(checkout: Path, given: str | None) -> str:
    """The commit of the checkout: ``--commit`` if given, else ``git rev-parse HEAD`` in it."""
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        raise SystemExit(f"{checkout} is not a git checkout: give its commit with --commit HASH") from err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="directory holding their model_utils.py")
    parser.add_argument("--commit", help="the checkout's commit hash (default: git rev-parse HEAD in it)")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--keep-float32-casts",
        action="store_true",
        help="record with their .float() casts as they are (writes laborieux_<case>_float32casts.pt)",
    )
    options = parser.parse_args()
    if not (options.checkout / "model_utils.py").is_file():
        raise SystemExit(f"checkout={options.checkout} holds no model_utils.py (clone {AUTHORS_REPO})")
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    commit = authors_commit(options.checkout, options.commit)
    options.out.mkdir(parents=True, exist_ok=True)
    for name in options.cases:
        case = CASES[name]
        result = run_theirs(options.checkout, case, options.keep_float32_casts)
        params = seeded_parameters(case)
        x, labels = synthetic_batch(case)
        fixture = {
            "case": name,
            "config": dict(case),
            "authors_repo": AUTHORS_REPO,
            "authors_commit": commit,
            "torch_version": torch.__version__,
            "float32_casts_kept": options.keep_float32_casts,
            "weight_seed": WEIGHT_SEED,
            "weight_sha256": {k: parity_tool.digest(v) for k, v in params.items()},
            "input_seed": INPUT_SEED,
            "input_sha256": parity_tool.digest(x),
            "labels": labels,
            **{key: [record(t) for t in result[key]] for key in ("free", "nudged_plus", "nudged_minus")},
            **{
                key: {k: record(v) for k, v in result[key].items()}
                for key in ("ep_update_symmetric", "ep_update_one_sided", "bptt_grad")
            },
        }
        suffix = "_float32casts" if options.keep_float32_casts else ""
        path = options.out / f"laborieux_{name}{suffix}.pt"
        torch.save(fixture, path)
        print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
