"""The one relaxation loop, shared by training, evaluation, the GDU check and Initialized EP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.stop_request import CHECK_EVERY, STOP, check_interrupt


class RelaxationTrace:
    """Per-step record of a relaxation s_0 → s_1 → … → s_T (pass it as ``relax(..., trace=...)``).

    At every step t = 1 … T it stores, per layer l and sample i, the residual r_t[l, i] = ‖s^l_t(i) − s^l_{t−1}(i)‖
    (Euclidean norm over the layer's units), and optionally the batch-mean Φ(x, s_t) (when ``x`` and ``model`` are
    given), every full state (``keep_states``) and the output layer of the first ``keep_outputs`` samples.
    Values stay on the device as tensors until read, so recording adds no host synchronisation per step; ``relax``
    only calls ``record`` when a trace is passed, so training without a trace pays nothing.
    """

    def __init__(
        self,
        x: Tensor | None = None,
        model: EnergyModel | None = None,
        keep_states: bool = False,
        keep_outputs: int = 0,
    ) -> None:
        """
        Args:
            x: the batch input, needed (with ``model``) to record Φ(x, s_t).
            model: the relaxing model, needed (with ``x``) to record Φ(x, s_t).
            keep_states: keep every state s_0 … s_T (detached) in ``states``.
            keep_outputs: keep the output layer of the first ``keep_outputs`` samples at s_0 … s_T in ``outputs``.
        """
        if keep_outputs < 0:
            raise ValueError(f"keep_outputs={keep_outputs} is invalid: use 0 (off) or a positive number of samples")
        self.x = x
        self.model = model
        self.keep_states = keep_states
        self.keep_outputs = int(keep_outputs)
        self._sample_residuals: list[Tensor] = []
        self._phi: list[Tensor] = []
        self._outputs: list[Tensor] = []
        self.states: list[State] = []

    def record(self, before: State, after: State) -> None:
        """Store the per-sample residual norm of every layer for the step ``before`` → ``after`` (and Φ(after))."""
        res = [(a - b).detach().flatten(1).norm(dim=1) for a, b in zip(after, before)]
        self._sample_residuals.append(torch.stack(res))
        if self.x is not None and self.model is not None:
            self._phi.append(self.model.phi(self.x, after).mean().detach())
        if self.keep_states:
            if not self.states:
                self.states.append(tuple(s.detach() for s in before))
            self.states.append(tuple(s.detach() for s in after))
        if self.keep_outputs:
            if not self._outputs:
                self._outputs.append(self._output(before))
            self._outputs.append(self._output(after))

    def _output(self, state: State) -> Tensor:
        """The model's prediction (``model.output``: a CE read-out's logits) for the first ``keep_outputs`` samples;
        the last state layer without a model."""
        head = tuple(s[: self.keep_outputs] for s in state)
        out = self.model.output(head) if self.model is not None else head[-1]
        return out.detach().flatten(1).clone()

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return len(self._sample_residuals)

    @property
    def sample_residuals(self) -> Tensor:
        """Tensor (steps, layers, batch): r_t[l, i] = ‖s^l_t(i) − s^l_{t−1}(i)‖ for t = 1 … steps."""
        return torch.stack(self._sample_residuals) if self._sample_residuals else torch.empty(0, 0, 0)

    @property
    def residuals(self) -> Tensor:
        """Tensor (steps, layers): residual norm at each step, batch mean."""
        return self.sample_residuals.mean(dim=2) if self._sample_residuals else torch.empty(0, 0)

    @property
    def total_residuals(self) -> Tensor:
        """Tensor (steps, batch): residual of the whole state per sample, r_t(i) = (Σ_l r_t[l, i]²)^½."""
        return self.sample_residuals.pow(2).sum(dim=1).sqrt() if self._sample_residuals else torch.empty(0, 0)

    @property
    def phi(self) -> Tensor:
        """Tensor (steps,): batch-mean Φ (or −E) after each step; empty when not recorded."""
        return torch.stack(self._phi) if self._phi else torch.empty(0)

    @property
    def outputs(self) -> Tensor:
        """Tensor (steps + 1, keep_outputs, n_out): output layer at s_0 … s_T; empty when not recorded."""
        return torch.stack(self._outputs) if self._outputs else torch.empty(0, 0, 0)


class StoppingRule:
    """Adaptive relaxation: stop as soon as the state has settled (pass it as ``relax(..., stop=...)``).

    After every ``check_every``-th step t, ``relax`` measures the largest per-sample, per-layer residual

        r_t = max_l max_i ‖s^l_t(i) − s^l_{t−1}(i)‖         (Euclidean norm over the units of layer l of sample i,
                                                             the quantity ``RelaxationTrace.sample_residuals`` holds)

    and stops if r_t < ``tolerance``; ``steps`` (the maximum) bounds the relaxation either way. Checking every
    ``check_every`` steps bounds the host synchronisations (one per check). After ``relax`` returns, ``steps_run``,
    ``converged`` and ``residual`` (the last r_t measured; NaN if none was) describe what happened.
    """

    def __init__(self, tolerance: float, check_every: int = 1) -> None:
        """
        Args:
            tolerance: stop once r_t < tolerance (> 0).
            check_every: measure r_t every this many steps (≥ 1).
        """
        if not 0.0 < float(tolerance) < float("inf"):
            raise ValueError(f"tolerance={tolerance} is invalid: use a finite residual > 0 (e.g. 1e-4)")
        if int(check_every) != check_every or check_every < 1:
            raise ValueError(f"check_every={check_every} is invalid: use an integer ≥ 1 (steps between checks)")
        self.tolerance = float(tolerance)
        self.check_every = int(check_every)
        self.steps_run = 0
        self.converged = False
        self.residual = float("nan")

    def settled(self, before: State, after: State) -> bool:
        """Measure r_t for the step ``before`` → ``after`` (one host sync) and compare it with the tolerance."""
        with torch.no_grad():
            r = torch.stack([(a - b).flatten(1).norm(dim=1).max() for a, b in zip(after, before)]).max()
        self.residual = float(r)
        return self.residual < self.tolerance


def relax(
    model: EnergyModel,
    drive: Any,
    state: State,
    steps: int,
    beta: float | Tensor = 0.0,
    target: Tensor | None = None,
    trace: RelaxationTrace | None = None,
    stop: StoppingRule | None = None,
) -> State:
    """Iterate s_{t+1} = step(s_t) ``steps`` times (free phase for β = 0, nudged phase otherwise).

    β may be a float or a per-sample tensor (symmetric nudging relaxes +β and −β as one doubled batch).
    With ``stop`` (adaptive relaxation) the loop ends early once the residual falls under its tolerance, checked
    every ``stop.check_every`` steps; ``stop.steps_run`` then holds the number of steps taken.
    Builds an autograd graph only if called with grad enabled and a parameter or input requires grad
    (the BPTT path); the EP phases call it under ``torch.no_grad()``.
    Every ``stop_request.CHECK_EVERY`` steps it raises ``RelaxationInterrupted`` if SIGTERM/SIGINT arrived, so a
    relaxation with a very large ``steps`` still stops promptly.
    """
    if stop is not None:
        stop.steps_run, stop.converged, stop.residual = 0, False, float("nan")
    for t in range(1, steps + 1):
        if t % CHECK_EVERY == 0 and STOP.relaxations:  # SIGTERM/SIGINT: a Python test, no host sync
            check_interrupt(t)
        new_state = model.step(state, drive, beta, target)
        if trace is not None:
            trace.record(state, new_state)
        settled = stop is not None and t % stop.check_every == 0 and stop.settled(state, new_state)
        state = new_state
        if stop is not None:
            stop.steps_run = t
            if settled:
                stop.converged = True
                break
    return state
