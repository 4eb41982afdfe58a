"""Record the computation of Ernoult et al.'s own code (github.com/ernoult/updatesEPgradientsBPTT, ``netClasses.py``)
for every Table-1 model, as fixtures for ``tests/test_parity.py``.

    python tools/parity_fixtures.py /path/to/updatesEPgradientsBPTT [--commit HASH] [--out tests/fixtures]

The authors' classes (``EPdisc``, ``EPcont``, ``convEP``) run on CPU in float64, on seeded weights (see
``seeded_parameters``; the fixture stores the seed and a SHA-256 of every tensor, so the test regenerates and checks
them) and on the first 20 MNIST training images (``data/MNIST/raw``), with each row's T, K, β of Table 1 and dt = 1 for
the P nets (the paper's value; their command-line default is 0.2). For each model the fixture holds, in this
repository's layer order (input → output) and parameter names: the free state after T steps, the nudged state after K
more steps, their EP update Δθ (``computeGradients``: what they add to θ), and their BPTT gradient ∂L/∂θ with
L = (1/2B)Σ‖s_out − y‖² through their window (K+1 steps for the fully connected nets, K for P-conv).

Large tensors are stored as sketches (fixed seeded projections and sampled entries, see ``sketch``), so the files stay
small; comparing sketches bounds the relative difference of the full tensors. None of the authors' code is copied:
it is imported from the given checkout. Their ``main.py`` parses the command line and loads data at import, so a
stand-in ``main`` module provides ρ and ρ', and ``torchvision`` (imported but unused by ``netClasses``) is stubbed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
AUTHORS_REPO = "https://github.com/ernoult/updatesEPgradientsBPTT"
BATCH = 20
WEIGHT_SEED = 1234
SKETCH_SEED = 4321
#: Tensors with more entries than this are stored as sketches.
FULL_LIMIT = 2_048
SKETCH_RANK = 4
SKETCH_ENTRIES = 512

#: Table 1 of Ernoult et al. 2019 (the configs in configs/mnist/*.yaml): layers input → output.
SIGMOID, HARD = "sigmoid", "hard_sigmoid"
MODELS: dict[str, dict[str, Any]] = {
    "p1h": {"kind": "p", "layers": [784, 512, 10], "T": 30, "K": 10, "beta": 0.1, "dt": 1.0, "activation": SIGMOID},
    "p2h": {
        "kind": "p",
        "layers": [784, 512, 512, 10],
        "T": 100,
        "K": 20,
        "beta": 0.5,
        "dt": 1.0,
        "activation": SIGMOID,
    },
    "p3h": {
        "kind": "p",
        "layers": [784, 512, 512, 512, 10],
        "T": 180,
        "K": 20,
        "beta": 0.5,
        "dt": 1.0,
        "activation": SIGMOID,
    },
    "eb1h": {"kind": "eb", "layers": [784, 512, 10], "T": 100, "K": 12, "beta": 0.5, "eps": 0.2, "activation": SIGMOID},
    "eb2h": {
        "kind": "eb",
        "layers": [784, 512, 512, 10],
        "T": 500,
        "K": 40,
        "beta": 0.5,
        "eps": 0.2,
        "activation": SIGMOID,
    },
    "pconv": {"kind": "conv", "channels": [32, 64], "T": 200, "K": 10, "beta": 0.4, "activation": HARD},
}


# --- shared with tests/test_parity.py (kept identical there; the stored hashes catch any divergence) ------------
def parameter_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of this repository's model, in ``named_parameters`` order."""
    if config["kind"] == "conv":
        c = [1, *config["channels"]]
        convs = [(f"convs.{i}", (c[i + 1], c[i], 5, 5)) for i in range(len(c) - 1)]
        out = [(f"{n}.{p}", s if p == "weight" else s[:1]) for n, s in convs for p in ("weight", "bias")]
        return out + [("fc.weight", (10, c[-1] * 4 * 4)), ("fc.bias", (10,))]
    layers = config["layers"]
    return [
        (f"synapses.{n}.{p}", (layers[n + 1], layers[n]) if p == "weight" else (layers[n + 1],))
        for n in range(len(layers) - 1)
        for p in ("weight", "bias")
    ]


def seeded_parameters(config: dict[str, Any], seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """float64 weights and biases ~ U(±1/√fan_in) (PyTorch's default range), drawn in order from one generator."""
    generator = torch.Generator().manual_seed(seed)
    params, fan_in = {}, 1
    for name, shape in parameter_shapes(config):
        if name.endswith("weight"):
            fan_in = int(torch.tensor(shape[1:]).prod())
        bound = fan_in**-0.5
        params[name] = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return params


def digest(t: torch.Tensor) -> str:
    """SHA-256 of the tensor's float64 bytes."""
    return hashlib.sha256(t.detach().to(torch.float64).contiguous().numpy().tobytes()).hexdigest()


def sketch(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Seeded linear sketch of a tensor viewed as a matrix M (rows = first dim): M R (right), Lᵀ M (left), sampled
    entries and the norm. R, L and the entries depend only on the shape and ``SKETCH_SEED``."""
    m = t.detach().to(torch.float64).reshape(t.shape[0], -1)
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    right = torch.randn(m.shape[1], SKETCH_RANK, generator=generator, dtype=torch.float64)
    left = torch.randn(SKETCH_RANK, m.shape[0], generator=generator, dtype=torch.float64)
    index = torch.randperm(m.numel(), generator=generator)[:SKETCH_ENTRIES]
    return {"right": m @ right, "left": left @ m, "entries": m.flatten()[index], "norm": m.norm().reshape(1)}


def record(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as stored in a fixture: in full if small, else as its sketch."""
    t = t.detach().to(torch.float64).clone()
    if t.numel() <= FULL_LIMIT:
        return {"full": t}
    return {"sketch": sketch(t), "shape": tuple(t.shape)}


# --- the authors' code ---------------------------------------------------------------------------------------------
def import_authors(checkout: Path, activation: str) -> types.ModuleType:
    """``netClasses`` from the checkout, with ρ/ρ' of ``activation`` (their ``main.py`` definitions) and torchvision
    stubbed."""
    if activation == "sigmoid":

        def rho(x: torch.Tensor) -> torch.Tensor:
            return 1 / (1 + torch.exp(-(4 * (x - 0.5))))

        def rhop(x: torch.Tensor) -> torch.Tensor:
            return 4 * torch.mul(rho(x), 1 - rho(x))

    else:

        def rho(x: torch.Tensor) -> torch.Tensor:
            return x.clamp(min=0).clamp(max=1)

        def rhop(x: torch.Tensor) -> torch.Tensor:
            return (x >= 0) & (x <= 1)

    sys.modules["torchvision"] = types.ModuleType("torchvision")
    main = types.ModuleType("main")
    main.rho, main.rhop = rho, rhop
    sys.modules["main"] = main
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    module = importlib.import_module("netClasses")
    module.rho, module.rhop = rho, rhop  # bound at import: reset for each model
    return module


def authors_args(config: dict[str, Any]) -> argparse.Namespace:
    """The command-line arguments their classes read (CPU: device_label = −1)."""
    args = argparse.Namespace(
        T=config["T"], Kmax=config["K"], beta=config["beta"], device_label=-1, no_clamp=False, lr_tab=[0.0] * 4
    )
    if config["kind"] == "conv":
        args.size_tab, args.C_tab = [10], [*reversed(config["channels"]), 1]
        args.Fconv, args.Fpool, args.padding, args.F = 5, 2, 0, 5
        args.dt = 1.0
    else:
        args.size_tab = list(reversed(config["layers"]))
        args.dt = config["dt"] if config["kind"] == "p" else config["eps"]
    return args


def authors_modules(net: nn.Module, config: dict[str, Any]) -> dict[str, nn.Module]:
    """Our module name → their module holding the same weights (their layers are indexed from the output)."""
    if config["kind"] == "conv":
        n = len(config["channels"])
        return {"fc": net.fc[0], **{f"convs.{i}": net.conv[n - 1 - i] for i in range(n)}}
    n = len(config["layers"]) - 1
    return {f"synapses.{i}": net.w[2 * (n - 1 - i)] for i in range(n)}


def to_ours(state: list[torch.Tensor]) -> list[torch.Tensor]:
    """Their state (output first) in our order (input → output)."""
    return [s.detach().clone() for s in reversed(state)]


def run_authors(checkout: Path, config: dict[str, Any], x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Free state, nudged state, EP update and BPTT gradient of their code, in our order and names."""
    torch.set_default_dtype(torch.float64)
    net_classes = import_authors(checkout, config["activation"])
    args = authors_args(config)
    kind = config["kind"]
    net = {"p": net_classes.EPdisc, "eb": net_classes.EPcont, "conv": net_classes.convEP}[kind](args).double()
    modules = authors_modules(net, config)
    params = seeded_parameters(config)
    with torch.no_grad():
        for name, module in modules.items():
            module.weight.copy_(params[f"{name}.weight"])
            module.bias.copy_(params[f"{name}.bias"])
    data = x.reshape(BATCH, 1, 28, 28) if kind == "conv" else x.reshape(BATCH, -1)
    targets = torch.nn.functional.one_hot(labels, 10).to(torch.float64)
    beta = net.beta

    # EP, as their netFunctions.train(method='eqprop')
    with torch.no_grad():
        if kind == "conv":
            s, inds = net.initHidden(BATCH)
            s, inds = net.forward(data, s, inds)
            seq = [t.clone() for t in s]
            indseq = [i.clone() if i is not None else None for i in inds]
            s, inds = net.forward(data, s, inds, seq, indseq, target=targets, beta=beta, method="nograd")
            gconv, gconv_b, gfc, gfc_b = net.computeGradients(beta, data, s, inds, seq, indseq)
            n = len(config["channels"])
            update = {"fc.weight": gfc[0], "fc.bias": gfc_b[0]}
            for i in range(n):
                update[f"convs.{i}.weight"], update[f"convs.{i}.bias"] = gconv[n - 1 - i], gconv_b[n - 1 - i]
        else:
            s = net.initHidden(BATCH)
            s = net.forward(data, s)
            seq = [t.clone() for t in s]
            s = net.forward(data, s, target=targets, beta=beta, method="nograd")
            gw, gb = net.computeGradients(beta, data, s, seq)
            n = len(config["layers"]) - 1
            update = {}
            for i in range(n):
                update[f"synapses.{i}.weight"], update[f"synapses.{i}.bias"] = gw[2 * (n - 1 - i)], gb[2 * (n - 1 - i)]
    free, nudged = to_ours(seq), to_ours(s)

    # BPTT, as their netFunctions.train(method='BPTT'): loss (1/2B)Σ‖s_0 − y‖², gradients of every weight
    for p in net.parameters():
        p.requires_grad_(True)
    net.zero_grad()
    if kind == "conv":
        s, inds = net.initHidden(BATCH)
        s, inds = net.forward(data, s, inds, method="withgrad")
    else:
        s = net.initHidden(BATCH)
        s = net.forward(data, s, method="withgrad")
    loss = (1 / (2 * BATCH)) * nn.MSELoss(reduction="sum")(s[0], targets)
    loss.backward()
    bptt = {}
    for name, module in modules.items():
        bptt[f"{name}.weight"], bptt[f"{name}.bias"] = module.weight.grad, module.bias.grad
    torch.set_default_dtype(torch.float32)
    return {"free": free, "nudged": nudged, "ep_update": update, "bptt_grad": bptt}


def first_training_images(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``BATCH`` MNIST training images (uint8, 28×28) and labels, read with this repository's IDX reader."""
    sys.path.insert(0, str(REPO))
    from ep_lightning.data import load_idx

    raw = data_dir / "MNIST" / "raw"
    images = load_idx(raw, "train-images-idx3-ubyte", verify=True)[:BATCH].clone()
    labels = load_idx(raw, "train-labels-idx1-ubyte", verify=True)[:BATCH].clone()
    return images, labels.long()


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
    parser.add_argument("checkout", type=Path, help="directory holding the authors' netClasses.py")
    parser.add_argument("--commit", help="the checkout's commit hash (default: git rev-parse HEAD in it)")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    options = parser.parse_args()
    if not (options.checkout / "netClasses.py").is_file():
        raise SystemExit(f"checkout={options.checkout} holds no netClasses.py (clone {AUTHORS_REPO})")
    torch.set_num_threads(1)
    commit = authors_commit(options.checkout, options.commit)
    images, labels = first_training_images(options.data_dir)
    x = images.to(torch.float64).reshape(BATCH, -1) / 255.0  # torchvision's ToTensor: uint8 / 255
    options.out.mkdir(parents=True, exist_ok=True)
    for name in options.models:
        config = MODELS[name]
        result = run_authors(options.checkout, config, x, labels)
        params = seeded_parameters(config)
        fixture = {
            "model": name,
            "config": dict(config),
            "bptt_window": config["K"] if config["kind"] == "conv" else config["K"] + 1,
            "authors_repo": AUTHORS_REPO,
            "authors_commit": commit,
            "torch_version": torch.__version__,
            "weight_seed": WEIGHT_SEED,
            "weight_sha256": {k: digest(v) for k, v in params.items()},
            "images": images,
            "labels": labels,
            "free": [record(t) for t in result["free"]],
            "nudged": [record(t) for t in result["nudged"]],
            "ep_update": {k: record(v) for k, v in result["ep_update"].items()},
            "bptt_grad": {k: record(v) for k, v in result["bptt_grad"].items()},
        }
        path = options.out / f"parity_{name}.pt"
        torch.save(fixture, path)
        print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
