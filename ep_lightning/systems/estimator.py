"""EstimatorSystem: the training step of EP and of truncated BPTT on top of the ``EnergySystem`` harness.

Per training batch (``training_step``):

    β_a, β_b         = draw_nudging_pair(): one_sided (0, β), random_sign (0, ±β; one draw), symmetric (−β, +β)
    s*, s_{β_a}, s_{β_b} = phases(x, y, initial_state(x, index), (β_a, β_b))       (``EnergySystem.phases``)
    loss             = mean[Φ(s_{β_a}) − Φ(s_{β_b})]/(β_b − β_a)  (+ the read-out's loss, + ``extra_loss``)
    manual_backward(loss); optimizer steps

(``ep_update`` → ``estimators.ep_surrogate``), or, for ``algorithm='bptt'``, back-propagation through the last
``bptt_steps`` of the T free steps (``bptt_update`` → ``estimators.bptt_loss``). A monitor may ask for the step's
phases to be recorded (``EnergySystem.record_next_step``). Subclasses say where a relaxation starts and what drives it
(``initial_state``, ``drive_options``) and add a loss of their own (``extra_loss``): see ``systems.equilibrium``
and ``systems.initialized``.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ep_lightning.checkpoints import SIGN_GENERATOR_KEY
from ep_lightning.compile import CompiledPhases
from ep_lightning.estimators import bptt_loss, ep_surrogate
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import NudgingPair
from ep_lightning.relaxation import Phases, PhaseTrace, StoppingRule
from ep_lightning.systems.base import NUDGINGS, EnergySystem, Nudging, unpack_batch


def run_seed(default: int = 0) -> int:
    """The run seed ($PL_GLOBAL_SEED, set by ``seed_everything``), else ``default``."""
    env = os.environ.get("PL_GLOBAL_SEED", "")
    return int(env) if env.lstrip("-").isdigit() else int(default)


class SignGenerator:
    """The random sign of β (Laborieux et al. 2021; O'Connor et al. 2019): a dedicated, seeded, picklable coin.

    One draw per training step from a ``torch.Generator`` seeded with the run seed gives every DDP rank the same sign
    (same seed, same number of draws), never touches the global RNG (so the data order and initialisation do not
    depend on the nudging variant), and its state goes into checkpoints so a resumed run continues the same sequence.
    It pickles its state as bytes: a bare ``torch.Generator`` does not pickle, and a tensor state sent by
    ``torch.multiprocessing`` (``ddp_spawn``) goes through shared memory.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def draw(self) -> bool:
        """One fair coin flip (True for +β)."""
        return bool(torch.randint(0, 2, (1,), generator=self.generator))

    def signed(self, beta: float) -> float:
        """+β or −β with probability ½ each (one draw)."""
        return beta if self.draw() else -beta

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def __getstate__(self) -> dict[str, Any]:
        return {"seed": self.seed, "state": self.generator.get_state().numpy().tobytes()}

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.seed = data["seed"]
        self.generator = torch.Generator()
        self.generator.set_state(torch.frombuffer(bytearray(data["state"]), dtype=torch.uint8).clone())


class Update(NamedTuple):
    """What an update rule returns for one batch: the loss whose gradient is the update, the relaxed state its
    training metrics are measured on, the states the divergence check reads (by phase name) and the free steps run."""

    loss: Tensor
    free: State
    checked: dict[str, State]
    free_steps: int


class EstimatorSystem(EnergySystem):
    """``EnergySystem`` trained by EP (or truncated BPTT) in ``training_step``; see the module docstring.

    Hooks beyond ``EnergySystem``'s: ``extra_loss(labels, start, free)`` (a loss added to the update, and its epoch
    sums), ``after_update(index, free)``.
    """

    def __init__(
        self,
        net: EnergyModel,
        T: int,
        K: int,
        beta: float,
        nudging: Nudging,
        sign_seed: int | None,
        eval_steps: int | None,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        algorithm: Literal["ep", "bptt"] = "ep",
        bptt_steps: int | None = None,
        free_tolerance: float | None = None,
        check_every: int = 5,
        compile_relaxation: bool = False,
    ) -> None:
        super().__init__(net, T, eval_steps, optimizer, lr_scheduler, K=K)
        self.beta = float(beta)
        self.nudging = nudging
        self.algorithm = algorithm
        self.bptt_steps = int(bptt_steps) if bptt_steps is not None else self.K
        self.free_tolerance = float(free_tolerance) if free_tolerance is not None else None
        self.check_every = int(check_every)
        self.compile_relaxation = bool(compile_relaxation)
        self._compiled_phases: CompiledPhases | None = None
        self._check_ep_settings()
        self.sign_generator = (
            SignGenerator(run_seed() if sign_seed is None else int(sign_seed)) if nudging == "random_sign" else None
        )
        self._pair = self._first_pair()

    def _check_ep_settings(self) -> None:
        if self.algorithm not in ("ep", "bptt"):
            raise ValueError(f"model.algorithm={self.algorithm!r} is not known; allowed: 'ep', 'bptt'")
        if self.K < 1:
            raise ValueError(f"model.K={self.K} is invalid: the nudged phase needs at least 1 step")
        if self.algorithm == "ep" and not 0 < self.beta < float("inf"):
            raise ValueError(f"model.beta={self.beta} is invalid for EP: β must be finite and > 0 (e.g. 0.1 to 0.5)")
        if self.nudging not in NUDGINGS:
            raise ValueError(f"model.nudging={self.nudging!r} is not known; allowed: {', '.join(map(repr, NUDGINGS))}")
        if self.algorithm == "bptt":
            if self.nudging != "one_sided":
                raise ValueError(
                    f"model.nudging={self.nudging!r} applies to EP only; with model.algorithm='bptt' use 'one_sided' "
                    f"(the default)"
                )
            if not 1 <= self.bptt_steps <= self.T:
                raise ValueError(
                    f"model.bptt_steps={self.bptt_steps} is invalid with model.T={self.T}: BPTT back-propagates "
                    f"through the last bptt_steps of the T steps, so use 1 ≤ bptt_steps ≤ T (null: K)"
                )
            if self.compile_relaxation:
                raise ValueError(
                    "model.compile_relaxation=true applies to EP's relaxation phases only; with model.algorithm='bptt' "
                    "set it to false"
                )
        if self.free_tolerance is not None and not 0 < self.free_tolerance < float("inf"):
            raise ValueError(
                f"model.free_tolerance={self.free_tolerance} is invalid: use a finite residual > 0 (e.g. 1e-4) or "
                f"null (always T steps)"
            )
        if self.compile_relaxation and self.free_tolerance is not None:
            raise ValueError(
                f"model.compile_relaxation=true cannot be combined with model.free_tolerance={self.free_tolerance} "
                "(the residual tests stop the compiled graph); set one of them to false / null"
            )
        if self.check_every < 1:
            raise ValueError(
                f"model.check_every={self.check_every} is invalid: use an integer ≥ 1 (steps between tests)"
            )

    # --- declared facts ---------------------------------------------------------------------------------------
    @property
    def has_nudged_phase(self) -> bool:
        """EP relaxes nudged phases; BPTT back-propagates through the free phase and has none."""
        return self.algorithm == "ep"

    def nudging_pair(self) -> NudgingPair | None:
        """The pair of the last training step (before any: one_sided and random_sign (0, +β), symmetric (−β, +β));
        None for BPTT. Reading never draws: the monitors show what training applied."""
        return self._pair if self.has_nudged_phase else None

    def divergence_knobs(self) -> dict[str, Any]:
        knobs = {"beta": self.beta if self.has_nudged_phase else None, **super().divergence_knobs()}
        return {**knobs, "K": self.K if self.has_nudged_phase else None}

    # --- hooks ----------------------------------------------------------------------------------------------
    def extra_loss(self, labels: Tensor, start: State, free: State) -> tuple[Tensor | None, dict[str, Tensor]]:
        """A loss added to the update in the same backward, and per-batch sums for the epoch means (none here)."""
        return None, {}

    def after_update(self, index: Tensor | None, free: State) -> None:
        """Called after the optimizers stepped (not for a skipped batch)."""

    # --- the nudging pair -------------------------------------------------------------------------------------
    def _first_pair(self) -> NudgingPair:
        return NudgingPair(-self.beta, self.beta) if self.nudging == "symmetric" else NudgingPair(0.0, self.beta)

    def draw_nudging_pair(self) -> NudgingPair:
        """The pair of this training step (one draw of the sign stream for random_sign), remembered for the
        monitors (``nudging_pair``)."""
        if self.sign_generator is not None:
            self._pair = NudgingPair(0.0, self.sign_generator.signed(self.beta))
        return self._pair

    # --- the update rules -----------------------------------------------------------------------------------------
    def ep_loss(self, x: Tensor, target: Tensor, phases: Phases, betas: NudgingPair) -> Tensor:
        """−∇ of this is the EP update of the pair (``ep_surrogate``), plus the read-out's update (``net.readout_loss``:
        at s*, or at the two nudged states) for models with a read-out outside the dynamics."""
        loss = ep_surrogate(self.net, x, phases.nudged_a, phases.nudged_b, betas)
        nudged = ((betas[0], phases.nudged_a), (betas[1], phases.nudged_b))
        readout = self.net.readout_loss(phases.free, target, nudged=nudged)
        return loss if readout is None else loss + readout

    def ep_update(
        self, x: Tensor, target: Tensor, start: State, trace: PhaseTrace | None = None, betas: NudgingPair | None = None
    ) -> Update:
        """The EP update of one batch for ``betas`` (default: this step's ``nudging_pair``) from ``start``."""
        betas = NudgingPair(*(self.nudging_pair() if betas is None else betas))
        stop = StoppingRule(self.free_tolerance, self.check_every) if self.free_tolerance is not None else None
        if self.compile_relaxation and trace is None:  # a traced step (a monitor's snapshot) runs eagerly
            if self._compiled_phases is None:
                self._compiled_phases = CompiledPhases(self.phases, x.device)
            phases = self._compiled_phases(x, target, start, betas)
        else:
            phases = self.phases(x, target, start, betas, trace=trace, stop=stop)
        checked = {"free": phases.free, "nudged": phases.nudged_b}
        if betas.a != 0.0:
            checked["nudged_a"] = phases.nudged_a
        return Update(self.ep_loss(x, target, phases, betas), phases.free, checked, stop.steps_run if stop else self.T)

    def bptt_update(self, x: Tensor, target: Tensor, start: State, trace: PhaseTrace | None = None) -> Update:
        """T − bptt_steps steps without graph (adaptive with ``free_tolerance``), then bptt_steps with graph from the
        batch's one drive (built with graph); loss = mean ℓ(s^T, y)."""
        stop = StoppingRule(self.free_tolerance, self.check_every) if self.free_tolerance is not None else None
        final = self.phases(x, target, start, None, trace=trace, stop=stop, graph_steps=self.bptt_steps).free
        steps = (stop.steps_run if stop is not None else self.T - self.bptt_steps) + self.bptt_steps
        return Update(bptt_loss(self.net, final, target), final, {"free": final}, steps)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels, index = unpack_batch(batch)
        target = self.net.encode_target(labels, x)
        optimizers = self.optimizer_list()
        for opt in optimizers:
            opt.zero_grad()
        trace = self.take_trace_request()
        start = self.initial_state(x, index)
        if self.algorithm == "bptt":
            update = self.bptt_update(x, target, start, trace)
        else:
            self.draw_nudging_pair()
            update = self.ep_update(x, target, start, trace)
        extra, extra_sums = self.extra_loss(labels, start, update.free)
        self.manual_backward(update.loss if extra is None else update.loss + extra)  # DDP all-reduces exactly this
        free = tuple(s.detach() for s in update.free)
        loss = self.net.cost(free, target).mean()
        if not self.check_training_step(batch_idx, update.checked):  # NaN/Inf: raises, or skips the batch
            return loss
        self.step_optimizers(optimizers)
        self.after_update(index, free)
        if self.free_tolerance is not None:
            n = x.shape[0]
            extra_sums["free_steps"] = torch.full(
                (), float(update.free_steps * n), dtype=loss.dtype, device=loss.device
            )
        self.update_epoch_sums(labels, free, loss, **extra_sums)
        return loss

    # --- exact resume: the β-sign stream --------------------------------------------------------------------
    def checkpoint_entries(self) -> dict[str, Any]:
        entries = super().checkpoint_entries()
        if self.sign_generator is not None:
            entries[SIGN_GENERATOR_KEY] = (self.sign_generator.get_state, self.sign_generator.set_state)
        return entries
