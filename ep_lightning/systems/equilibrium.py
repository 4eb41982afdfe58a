"""EquilibriumModule: EP or truncated BPTT on any EnergyModel, relaxing from the network's initial state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ep_lightning.errors import ConfigError
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.systems.base import EPSystem, Nudging, OptimizerSpec, float_list, sgd
from ep_lightning.warm_start import PersistentStates

#: Checkpoint key of the warm-start table (exact resume).
WARM_START_KEY = "ep_warm_start_states"


class EquilibriumModule(EPSystem):
    """EP (or BPTT) from ``net.init_state``; the training step is ``EPSystem.training_step``.

    EP:   s* = relax(T, β=0);  s_{β_a}, s_{β_b} = relax(K, β_a / β_b) from s*;
          loss = mean[Φ(s_{β_a}) − Φ(s_{β_b})]/(β_b − β_a) → manual_backward.
    BPTT: relax(T − bptt_steps) without graph, then bptt_steps with graph;  loss = mean ℓ(s^T, y) → manual_backward.
    Evaluation runs ``eval_steps`` free steps (default T) from the initial state and scores the output.

    Options beyond ``EPSystem``: ``warm_start`` (the training free phase of each example starts from its last
    free-phase state) and, through ``EPSystem``, ``free_tolerance`` (adaptive free phase) and ``compile_relaxation``.
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
            compile_relaxation: EP only. Compile the training step's relaxation (``EPSystem.phases``: drive, free
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
        self.save_hyperparameters(ignore=["net"])
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
        readout = getattr(self.net, "readout", "mse") == "ce"
        return [OptimizerSpec(self.net.parameter_groups(), self.lrs, self.weight_decays, readout=readout)]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", None)
        if self.warm_start and stage == "fit" and hparams is not None and not hparams.get("return_index", True):
            raise ConfigError(
                "model.warm_start=true needs the dataset index of every training sample: set data.return_index=true "
                "(training batches become (x, y, index))"
            )

    # --- warm start -----------------------------------------------------------------------------------------
    def start_state(self, x: Tensor, index: Tensor | None) -> State:
        """The example's last free-phase state (warm start), else ``init_state``."""
        init = self.net.init_state(x)
        if self.warm_states is None:
            return init
        if index is None:
            raise ValueError(
                "model.warm_start=true needs training batches (x, y, index): set data.return_index=true (or yield the "
                "dataset index of every sample as the third batch element)"
            )
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        dataset = getattr(loader, "dataset", None)  # a DataLoader (one training loader): size the table once
        return self.warm_states.start(index, init, size_hint=len(dataset) if dataset is not None else None)

    def after_update(self, index: Tensor | None, free: State) -> None:
        if self.warm_states is not None:
            self.warm_states.store(index, free)  # after the guard: a diverged state is never reused

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.warm_states is not None:
            checkpoint[WARM_START_KEY] = self.warm_states.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.warm_states is not None and WARM_START_KEY in checkpoint:
            self.warm_states.load_state_dict(checkpoint[WARM_START_KEY])
