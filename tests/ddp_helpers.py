"""Picklable pieces for the DDP tests (``tests/test_ddp.py``): worker processes unpickle them by module name.

Kept out of the test file so that the workers of ``ddp_spawn`` import only this small module.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ep_lightning.models import ConvPrototypicalNet, EnergyBasedNet, PrototypicalNet
from ep_lightning.models.base import EnergyModel
from ep_lightning.systems import EquilibriumModule

# Initialized EP is tested only where its module exists; if it exists, any import error surfaces (no silent skip).
if importlib.util.find_spec("ep_lightning.systems.initialized") is not None:
    from ep_lightning.systems.initialized import InitializedEP
else:  # pragma: no cover
    InitializedEP = None  # type: ignore[assignment,misc]

#: Tiny images shared by every model of the tests: 1×14×14 (the conv net needs a spatial input), 4 classes.
IMAGE = (1, 14, 14)
CLASSES = 4


def tiny_model(kind: str) -> EnergyModel:
    """A small network of each family: ``p`` (P-net), ``eb`` (EB net), ``conv`` (P-conv)."""
    n_in = IMAGE[0] * IMAGE[1] * IMAGE[2]
    if kind == "p":
        return PrototypicalNet([n_in, 8, CLASSES], activation="sigmoid")
    if kind == "eb":
        return EnergyBasedNet([n_in, 8, CLASSES], activation="sigmoid", eps=0.5)
    if kind == "conv":
        # 14 → conv 3×3 → 12 → pool 2 → 6 → conv 3×3 → 4 → pool 2 → 2: states 2×6×6, 3×2×2 and 4 outputs.
        # Paper sigmoid rather than the hard sigmoid: at this size a hard-sigmoid output layer can start saturated
        # (σ' = 0 everywhere), leaving BPTT nothing to send and the test nothing to compare.
        return ConvPrototypicalNet(
            input_size=14, channels=[2, 3], kernel_size=3, num_classes=CLASSES, activation="sigmoid"
        )
    raise ValueError(f"kind={kind!r} is not known; allowed: 'p', 'eb', 'conv'")


def tiny_dataset(n: int, seed: int = 0) -> TensorDataset:
    """n float64 images in [0, 1] with random labels. Pixel [0, 0, 0] holds the sample id as i / n, so that a
    callback can tell which samples each rank trained on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *IMAGE, generator=g, dtype=torch.float64)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float64) / n
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


def sample_ids(x: Tensor, n: int) -> list[int]:
    """The sorted ids of the samples in a batch of ``tiny_dataset(n)`` images."""
    return sorted((x[:, 0, 0, 0] * n).round().long().tolist())


class RecordRun(L.Callback):
    """Writes ``rank{global_rank}.pt`` into ``out_dir`` at the end of fit: the final weights of every parameter of
    the module (CPU copies), the sample ids of every training batch this rank saw (in order) and the world size."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = str(out_dir)
        self.sample_ids: list[list[int]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.sample_ids.append(sample_ids(batch[0], len(trainer.train_dataloader.dataset)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {k: p.detach().cpu().clone() for k, p in pl_module.named_parameters()}
        record = {"weights": weights, "sample_ids": self.sample_ids, "world_size": trainer.world_size}
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class HandWrittenGradEP(EquilibriumModule):
    """NEGATIVE CONTROL, deliberately wrong: computes the EP update with ``torch.autograd.grad`` and assigns
    ``p.grad`` by hand instead of calling ``self.manual_backward``. DDP never sees these gradients, so each replica
    follows its own data shard and the replicas drift apart without any error."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        target = self.net.encode_target(labels, x)
        optimizer = self.optimizers()
        loss = self.ep_update(x, target, self.net.init_state(x))[0]
        params = list(self.net.parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g  # the mistake under test
        optimizer.step()
        return loss.detach()


if InitializedEP is not None:

    class RankDependentSignIEP(InitializedEP):
        """NEGATIVE CONTROL for the random β sign, deliberately wrong: +β on rank 0 and −β on the other ranks, what
        per-rank random generators can give. Every rank still ends with the same weights (DDP averages the
        gradients), but the run no longer equals a single process on the full batch."""

        def nudging_pair(self) -> tuple[float, float]:
            return (0.0, self.beta if self.global_rank == 0 else -self.beta)
