"""Train a P net with Ernoult et al.'s own code and with ours side by side, on the same batches from the same
initial weights, and print how far the two weight trajectories drift apart.

    python tools/trajectory_parity.py /path/to/updatesEPgradientsBPTT --model p2h --batches 3000 [--float64]

Both runs see the MNIST training images in one seeded order (``--order-seed``), batch 20, the Table-1 T, K, β and
learning rates of the row (``configs/mnist/<model>_ep.yaml`` values, dt = 1). Their side is their ``EPdisc`` class
(``forward`` for the free and nudged phases, ``updateWeights``), driven as their ``netFunctions.train`` drives it; our
side is ``PrototypicalNet`` with ``relaxation.relax``, the EP surrogate and ``torch.optim.SGD`` with one learning rate
per layer, i.e. the arithmetic of ``EquilibriumModule.training_step``. Every ``--every`` batches it prints the largest
relative weight difference per layer (‖W_ours − W_theirs‖ / ‖W_theirs‖) and both running training errors.

In float64 the two trajectories agree to rounding if the implementations compute the same thing (the one-step
agreement is 1e-13, tests/test_parity.py); in float32 rounding differences grow as the chaotic training dynamics
amplify them, which shows how quickly two equal implementations decorrelate. None of the authors' code is copied:
it is imported from the checkout (see tools/parity_fixtures.py, whose import helpers this script uses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from parity_fixtures import authors_args, authors_modules, import_authors

from ep_lightning.data import load_idx
from ep_lightning.estimators import ep_surrogate
from ep_lightning.models import PrototypicalNet
from ep_lightning.relaxation import relax

#: Table 1 rows (configs/mnist/<row>_ep.yaml): layers input → output, T, K, β, learning rates input → output.
ROWS = {
    "p1h": {"layers": [784, 512, 10], "T": 30, "K": 10, "beta": 0.1, "lrs": [0.08, 0.04]},
    "p2h": {"layers": [784, 512, 512, 10], "T": 100, "K": 20, "beta": 0.5, "lrs": [0.2, 0.05, 0.005]},
    "p3h": {"layers": [784, 512, 512, 512, 10], "T": 180, "K": 20, "beta": 0.5, "lrs": [0.2, 0.05, 0.01, 0.002]},
}
BATCH = 20


def relative_differences(ours: PrototypicalNet, modules: dict[str, torch.nn.Module]) -> list[float]:
    """max(‖ΔW‖/‖W‖, ‖Δb‖/‖b‖) per synapse, input → output."""
    out = []
    with torch.no_grad():
        for i, synapse in enumerate(ours.synapses):
            theirs = modules[f"synapses.{i}"]
            w = (synapse.weight - theirs.weight).norm() / theirs.weight.norm()
            b = (synapse.bias - theirs.bias).norm() / theirs.bias.norm()
            out.append(float(max(w, b)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="directory holding the authors' netClasses.py")
    parser.add_argument("--model", choices=list(ROWS), default="p2h")
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--float64", action="store_true", help="both runs in float64 (default float32, as trained)")
    parser.add_argument("--order-seed", type=int, default=0)
    parser.add_argument("--weight-seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float64 if options.float64 else torch.float32
    row = ROWS[options.model]

    raw = REPO / "data" / "MNIST" / "raw"
    images = load_idx(raw, "train-images-idx3-ubyte", verify=True).reshape(-1, 784).to(dtype) / 255.0
    labels = load_idx(raw, "train-labels-idx1-ubyte", verify=True).long()
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(options.order_seed))

    torch.manual_seed(options.weight_seed)
    ours = PrototypicalNet(row["layers"], activation="sigmoid", dt=1.0).to(dtype)
    groups = [{"params": g, "lr": lr} for g, lr in zip(ours.parameter_groups(), row["lrs"])]
    optimizer = torch.optim.SGD(groups, lr=0.0)

    config = {"kind": "p", "layers": row["layers"], "T": row["T"], "K": row["K"], "beta": row["beta"], "dt": 1.0}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # their initHidden allocates states in the default dtype
    net_classes = import_authors(options.checkout, "sigmoid")
    args = authors_args(config)
    args.lr_tab = list(reversed(row["lrs"]))  # their lr_tab is output → input
    theirs = net_classes.EPdisc(args).to(dtype)
    modules = authors_modules(theirs, config)
    with torch.no_grad():
        for i, synapse in enumerate(ours.synapses):
            modules[f"synapses.{i}"].weight.copy_(synapse.weight)
            modules[f"synapses.{i}"].bias.copy_(synapse.bias)

    wrong = {"ours": 0, "theirs": 0}
    seen = 0
    print(f"{options.model}, {dtype}, order seed {options.order_seed}, weight seed {options.weight_seed}")
    print("batch | rel. weight difference per layer (input → output) | train error ours / theirs")
    for b in range(options.batches):
        index = order[(b * BATCH) % labels.shape[0] :][:BATCH]
        x, y = images[index], labels[index]
        target = torch.nn.functional.one_hot(y, 10).to(dtype)

        # theirs: netFunctions.train(method='eqprop')
        with torch.no_grad():
            s = theirs.forward(x, theirs.initHidden(BATCH))
            wrong["theirs"] += int((s[0].argmax(dim=1) != y).sum())
            seq = [t.clone() for t in s]
            s = theirs.forward(x, s, target=target, beta=theirs.beta, method="nograd")
            theirs.updateWeights(theirs.beta, x, s, seq)

        # ours: EquilibriumModule.training_step's arithmetic
        optimizer.zero_grad()
        with torch.no_grad():
            drive = ours.drive(x)
            free = relax(ours, drive, ours.init_state(x), row["T"])
            nudged = relax(ours, drive, free, row["K"], row["beta"], target)
        wrong["ours"] += int((free[-1].argmax(dim=1) != y).sum())
        ep_surrogate(ours, x, free, nudged, (0.0, row["beta"])).backward()
        optimizer.step()

        seen += BATCH
        if (b + 1) % options.every == 0 or b + 1 == options.batches:
            diffs = " ".join(f"{d:.2e}" for d in relative_differences(ours, modules))
            err = f"{100 * wrong['ours'] / seen:.2f} % / {100 * wrong['theirs'] / seen:.2f} %"
            print(f"{b + 1:5d} | {diffs} | {err}", flush=True)
    torch.set_default_dtype(previous)


if __name__ == "__main__":
    main()
