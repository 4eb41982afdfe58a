"""EquilibriumModule: EP or truncated BPTT on any EnergyModel, relaxing from the network's initial state (or, with
``warm_start``, from each training example's last free-phase state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.utils.data import DataLoader

from ep_lightning.checkpoints import WARM_START_KEY
from ep_lightning.errors import ConfigError
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.systems.base import Nudging, OptimizerSpec, float_list, sgd, unpack_batch
from ep_lightning.systems.estimator import EstimatorSystem


class EquilibriumModule(EstimatorSystem):
    """EP (or BPTT) from ``net.init_state``; the training step is ``EstimatorSystem.training_step``.

    EP:   s* = relax(T, β=0);  s_{β_a}, s_{β_b} = relax(K, β_a / β_b) from s*;
          loss = mean[Φ(s_{β_a}) − Φ(s_{β_b})]/(β_b − β_a) → manual_backward.
    BPTT: relax(T − bptt_steps) without graph, then bptt_steps with graph;  loss = mean ℓ(s^T, y) → manual_backward.
    Evaluation runs ``eval_steps`` free steps (default T) from the initial state and scores the output.

    Options beyond ``EstimatorSystem``: ``warm_start`` (the training free phase of each example starts from its last
    free-phase state) and, through ``EstimatorSystem``, ``free_tolerance`` (adaptive free phase) and
    ``compile_relaxation``.
    """

    def __init__(
        self,
        net: EnergyModel,
        algorithm: Literal["ep", "bptt"] = "ep",
        T: int = 30,
        K: int = 10,
        beta: float = 0.1,
        lrs: Sequence[float] | None = None,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_steps: int | None = None,
        nudging: Nudging = "one_sided",
        warm_start: bool = False,
        free_tolerance: float | None = None,
        check_every: int = 5,
        weight_decays: Sequence[float] | None = None,
        sign_seed: int | None = None,
        compile_relaxation: bool = False,
        bptt_steps: int | None = None,
    ) -> None:
        """
        Args:
            net: the convergent network (an ``EnergyModel``), e.g. ``ep_lightning.models.PrototypicalNet``.
            algorithm: ``ep`` (Equilibrium Propagation) or ``bptt`` (truncated back-propagation through time).
            T: free-phase steps (for BPTT: total steps).
            K: nudged-phase steps (EP).
            beta: nudging strength β (> 0); used by EP only.
            lrs: one learning rate per layer group, input → output (``net.parameter_groups()``; with a
                ``readout: ce`` net the last group is the softmax read-out). Required with the default optimizer;
                null: the optimizer's own lr.
            optimizer: optimizer factory taking the parameter groups (default plain SGD), e.g. ``torch.optim.SGD``
                with ``momentum`` or ``torch.optim.Adam``; per-group ``lrs``/``weight_decays`` override its values.
            lr_scheduler: optional scheduler factory, stepped once per epoch (e.g. ``CosineAnnealingLR``).
            eval_steps: free-phase steps for validation/test/predict (default: T).
            nudging: EP only. ``one_sided`` (0, β) — the 2019 paper; ``symmetric`` (−β, +β), both nudged phases
                from s* as one doubled batch, gradient bias O(β²); ``random_sign`` (0, ±β), the sign drawn per batch
                from a seeded generator identical on every DDP rank and saved in checkpoints.
            warm_start: start each training example's free phase from its last free-phase state (persistent fixed
                points); needs batches ``(x, y, index)`` (``data.return_index: true``). The per-example table
                (N × state size values) lives on the training device and in checkpoints. Evaluation always starts
                from the initial state. Under DDP each rank keeps its own table.
            free_tolerance: adaptive training free phase (EP; BPTT: its steps without graph): stop when
                max over layers and samples of ‖s_{t+1} − s_t‖ < free_tolerance, at most T steps (null: always T).
                Logs ``train/free_steps``.
            check_every: with ``free_tolerance``, test the residual every this many steps (one host sync per test).
            weight_decays: one weight decay per layer group, input → output; null: the optimizer's own value.
            sign_seed: seed of the β-sign generator for ``random_sign`` (default: the run seed, else 0).
            compile_relaxation: EP only. Compile the training step's relaxation (``phases``: drive, free
                and nudged phases) into one graph (``ep_lightning.compile.CompiledPhases``). Same arithmetic,
                possibly reordered by the compiler; compiles once per batch shape and β; needs a C++ compiler. Not
                with ``free_tolerance``.
            bptt_steps: BPTT back-propagates through the last ``bptt_steps`` of the T steps (1 ≤ bptt_steps ≤ T;
                null: K).
        """
        super().__init__(
            net,
            T,
            K,
            beta,
            nudging,
            sign_seed,
            eval_steps,
            optimizer,
            lr_scheduler,
            algorithm=algorithm,
            bptt_steps=bptt_steps,
            free_tolerance=free_tolerance,
            check_every=check_every,
            compile_relaxation=compile_relaxation,
        )
        self.save_system_hyperparameters(net=net)
        self.lrs = float_list(lrs)
        self.weight_decays = float_list(weight_decays)
        self.warm_start = bool(warm_start)
        if self.T < 1:
            raise ValueError(f"model.T={self.T} is invalid: the free phase needs at least 1 step")
        if self.eval_steps < 1:
            raise ValueError(f"model.eval_steps={self.eval_steps} is invalid: use at least 1 step (or null for T)")
        self.check_optimizer_settings()
        self.warm_states = PersistentStates() if self.warm_start else None

    def optimizer_specs(self) -> list[OptimizerSpec]:
        readout = self.net.readout == "ce"
        return [OptimizerSpec(self.net.parameter_groups(), self.lrs, self.weight_decays, readout=readout)]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", None)  # a foreign object: any LightningDataModule
        if self.warm_start and stage == "fit" and hparams is not None and not hparams.get("return_index", True):
            raise ConfigError(
                "model.warm_start=true needs the dataset index of every training sample: set data.return_index=true "
                "(training batches become (x, y, index))"
            )

    # --- warm start -----------------------------------------------------------------------------------------
    def initial_state(self, x: Tensor, index: Tensor | None = None) -> State:
        """With ``warm_start`` and the dataset ``index`` of a training batch: each example's last free-phase state
        (``init_state`` for examples not seen yet); otherwise (evaluation, monitors, no warm start) ``init_state``."""
        init = self.net.init_state(x)
        if self.warm_states is None or index is None:
            return init
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        size = len(loader.dataset) if isinstance(loader, DataLoader) else None  # one training loader: size the table
        return self.warm_states.start(index, init, size_hint=size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.warm_states is not None and unpack_batch(batch)[2] is None:
            raise ValueError(
                "model.warm_start=true needs training batches (x, y, index): set data.return_index=true (or yield the "
                "dataset index of every sample as the third batch element)"
            )
        super().on_train_batch_start(batch, batch_idx)

    def after_update(self, index: Tensor | None, free: State) -> None:
        if self.warm_states is not None:
            self.warm_states.store(index, free)  # after the guard: a diverged state is never reused

    def checkpoint_entries(self) -> dict[str, Any]:
        entries = super().checkpoint_entries()
        if self.warm_states is not None:
            entries[WARM_START_KEY] = (self.warm_states.state_dict, self.warm_states.load_state_dict)
        return entries


class PersistentStates:
    """Warm starts: the last free-phase state of every training example, reused as its next initial state
    (persistent fixed points, Scellier & Bengio 2017), indexed by the dataset index of each training sample.

    Memory: N × Σ_l (units of layer l) values in the net's dtype, on the training device. The table is allocated at
    the first training batch (sized from the dataset when known) and saved in checkpoints (moved to CPU), so a
    resumed run continues from exactly the same states.
    """

    def __init__(self) -> None:
        self.states: list[Tensor] | None = None
        #: seen[i]: example i has a stored state (examples not seen yet start from the model's ``init_state``).
        self.seen: Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.seen is None else int(self.seen.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the table, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.states or [])

    def _ensure(self, index: Tensor, like: State, size_hint: int | None) -> None:
        """Allocate (or grow) the table to hold the examples ``index``, on ``like``'s device and dtype.

        With ``size_hint`` (the dataset size; every index is below it) the indices are never inspected: no host
        synchronisation. Without it the table grows to the largest index seen."""
        device = like[0].device
        if self.states is not None and (self.states[0].device != device or self.states[0].dtype != like[0].dtype):
            self.states = [t.to(device=device, dtype=like[0].dtype) for t in self.states]
            self.seen = self.seen.to(device)
        if size_hint is not None and self.capacity >= size_hint:
            return
        needed = size_hint if size_hint is not None else int(index.max()) + 1
        if needed <= self.capacity:
            return
        size = max(needed, size_hint or 0, math.ceil(1.25 * self.capacity))
        new_states = [s.new_zeros(size, *s.shape[1:]) for s in like]
        new_seen = torch.zeros(size, dtype=torch.bool, device=device)
        if self.states is not None:
            for new, old in zip(new_states, self.states):
                new[: old.shape[0]] = old
            new_seen[: self.capacity] = self.seen
        self.states, self.seen = new_states, new_seen

    def start(self, index: Tensor, init: State, size_hint: int | None = None) -> State:
        """The initial state of the batch: the stored state of each example seen before, ``init`` otherwise."""
        index = index.to(device=init[0].device, dtype=torch.long)
        self._ensure(index, init, size_hint)
        assert self.states is not None and self.seen is not None
        seen = self.seen[index]
        return tuple(
            torch.where(seen.view(-1, *([1] * (s.dim() - 1))), table[index], s) for s, table in zip(init, self.states)
        )

    def store(self, index: Tensor, state: State) -> None:
        """Remember ``state`` (detached) as the next initial state of the examples ``index``."""
        assert self.states is not None and self.seen is not None, "call start() before store()"
        index = index.to(device=self.seen.device, dtype=torch.long)
        with torch.no_grad():
            for table, s in zip(self.states, state):
                table[index] = s.detach().to(table.dtype)
            self.seen[index] = True

    def state_dict(self) -> dict[str, Any]:
        if self.states is None or self.seen is None:
            return {}
        return {"states": [t.cpu() for t in self.states], "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a table saved by ``state_dict`` (it moves to the training device at the next ``start``)."""
        if not state:
            self.states, self.seen = None, None
            return
        self.states = [t.clone() for t in state["states"]]
        self.seen = state["seen"].clone()
