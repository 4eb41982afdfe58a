"""The one relaxation loop, shared by training, evaluation, the GDU check and Initialized EP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ep_lightning.models.base import EnergyModel, State


class RelaxationTrace:
    """Per-step record of a relaxation: residuals ‖s_{t+1} − s_t‖ per layer (and Φ when ``x`` is given).

    Values stay on the device as tensors until read, so recording adds no host synchronisation per step.
    """

    def __init__(self, x: Tensor | None = None, model: EnergyModel | None = None, keep_states: bool = False) -> None:
        self.x = x
        self.model = model
        self.keep_states = keep_states
        self._residuals: list[Tensor] = []
        self._phi: list[Tensor] = []
        self.states: list[State] = []

    def record(self, before: State, after: State) -> None:
        """Store mean over the batch of the per-sample residual norm of every layer (and Φ of ``after``)."""
        res = [(a - b).flatten(1).norm(dim=1).mean() for a, b in zip(after, before)]
        self._residuals.append(torch.stack(res).detach())
        if self.x is not None and self.model is not None:
            self._phi.append(self.model.phi(self.x, after).mean().detach())
        if self.keep_states:
            if not self.states:
                self.states.append(tuple(s.detach() for s in before))
            self.states.append(tuple(s.detach() for s in after))

    @property
    def residuals(self) -> Tensor:
        """Tensor (steps, layers): residual norm at each step, batch mean."""
        return torch.stack(self._residuals) if self._residuals else torch.empty(0, 0)

    @property
    def phi(self) -> Tensor:
        """Tensor (steps,): batch-mean Φ (or −E) after each step; empty when not recorded."""
        return torch.stack(self._phi) if self._phi else torch.empty(0)


def relax(
    model: EnergyModel,
    drive: Any,
    state: State,
    steps: int,
    beta: float = 0.0,
    target: Tensor | None = None,
    trace: RelaxationTrace | None = None,
) -> State:
    """Iterate s_{t+1} = step(s_t) ``steps`` times (free phase for β = 0, nudged phase otherwise).

    Builds an autograd graph only if called with grad enabled and a parameter or input requires grad
    (the BPTT path); the EP phases call it under ``torch.no_grad()``.
    """
    for _ in range(steps):
        new_state = model.step(state, drive, beta, target)
        if trace is not None:
            trace.record(state, new_state)
        state = new_state
    return state
