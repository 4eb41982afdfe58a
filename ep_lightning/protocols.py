"""What callbacks and the GDU check may read from a system (``ep_lightning.systems``), declared once.

Every ``EnergySystem`` satisfies ``RelaxingSystem``; the EP / BPTT systems (``EstimatorSystem``: EquilibriumModule,
InitializedEP) also ``NudgingSystem``; ``InitializedEP`` and ``InitializerDistillation`` also ``InitializedSystem``.
The callbacks relax nothing themselves: they go through the system's ``phases`` (the one phase runner).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.initializer import FeedforwardInitializer
from ep_lightning.models.nudging import NudgingPair
from ep_lightning.relaxation import Phases, PhaseTrace


@runtime_checkable
class RelaxingSystem(Protocol):
    """A system relaxing ``net``: T free steps from ``initial_state(x)`` with ``relaxation_drive(x, start)``, then,
    when it ``has_nudged_phase``, K nudged steps at each β ≠ 0 of its ``nudging_pair()``."""

    net: EnergyModel
    T: int
    K: int
    eval_steps: int
    lrs: list[float] | None
    algorithm: str

    @property
    def has_nudged_phase(self) -> bool:
        """Whether training relaxes nudged phases (EP): the monitors show them only then."""
        ...

    def nudging_pair(self) -> NudgingPair | None:
        """The pair the last training step used (None without a nudged phase); reading never draws a sign."""
        ...

    def initial_state(self, x: Tensor, index: Tensor | None = None) -> State:
        """Where a free phase starts."""
        ...

    def relaxation_drive(self, x: Tensor, start: State) -> Any:
        """The constant input term of the dynamics for a relaxation from ``start``."""
        ...

    def phases(self, x: Tensor, target: Tensor | None, start: State, betas: Any, **options: Any) -> Phases:
        """The phases of one batch: ``EnergySystem.phases`` (options: trace, steps, stop, graph_steps, drive)."""
        ...

    def record_next_step(self, trace: PhaseTrace) -> None:
        """Have the next training step record its phases, as applied, into ``trace``."""
        ...


@runtime_checkable
class NudgingSystem(RelaxingSystem, Protocol):
    """A system trained by EP (or truncated BPTT): β, and the loss whose gradient is the EP update of a pair."""

    beta: float

    def ep_loss(self, x: Tensor, target: Tensor, phases: Phases, betas: NudgingPair) -> Tensor:
        """−∇_θ of this is the update training applies to the net for these phases and this pair."""
        ...


@runtime_checkable
class InitializedSystem(RelaxingSystem, Protocol):
    """A system whose free phase starts from a feedforward initializer's prediction s^f (None: from zero).

    ``truncated_free_phase`` is true when T is short on purpose (Initialized EP: a few negative steps from s^f), so
    that a free phase ending unconverged is expected rather than a sign of too small a T.
    """

    initializer: FeedforwardInitializer | None
    truncated_free_phase: bool


def expects_converged_free_phase(system: RelaxingSystem) -> bool:
    """False for a system that declares its free phase truncated on purpose (``InitializedSystem``), else True."""
    return not (isinstance(system, InitializedSystem) and system.truncated_free_phase)
