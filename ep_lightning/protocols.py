"""What callbacks and the GDU check may read from a system (``ep_lightning.systems``), declared once.

Every ``EnergySystem`` satisfies ``RelaxingSystem``; ``InitializedEP`` and ``InitializerDistillation`` also satisfy
``InitializedSystem``. A system without a nudged phase has ``K = 0`` and ``beta = 0``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.initializer import FeedforwardInitializer


@runtime_checkable
class RelaxingSystem(Protocol):
    """A system relaxing ``net``: T free steps from ``initial_state(x)`` with ``relaxation_drive(x, start)``, then
    K nudged steps at β."""

    net: EnergyModel
    T: int
    K: int
    beta: float
    eval_steps: int
    lrs: list[float] | None

    def initial_state(self, x: Tensor) -> State:
        """Where a free phase starts (no graph)."""
        ...

    def relaxation_drive(self, x: Tensor, start: State) -> Any:
        """The constant input term of the dynamics for a relaxation from ``start``."""
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
