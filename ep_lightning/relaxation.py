"""The one relaxation loop (``relax``), shared by training, evaluation, the monitors, the GDU check and Initialized EP,
and the one place that builds a batch's phases from it (``relax_phases``: s*, then the nudged phases of a pair)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import Beta, NudgingPair, repeat_batch
from ep_lightning.stop_request import CHECK_EVERY, STOP, check_interrupt


class RelaxationTrace:
    """Per-step record of a relaxation s_0 → s_1 → … → s_T (pass it as ``relax(..., trace=...)``).

    At every step t = 1 … T it stores, per layer l and sample i, the residual r_t[l, i] = ‖s^l_t(i) − s^l_{t−1}(i)‖
    (Euclidean norm over the layer's units), and optionally the per-sample Φ(x, s_t) (when ``x`` and ``model`` are
    given), every full state (``keep_states``) and the model's output at s_0 … s_T (``keep_outputs``: read back for
    the first that many samples). Values stay on the device as tensors until read, so recording adds no host
    synchronisation per step; ``relax`` only calls ``record`` when a trace is passed, so training without a trace pays
    nothing. Recording builds no graph, also inside a relaxation that does (BPTT).
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
            keep_outputs: keep the output at s_0 … s_T; ``outputs`` shows the first ``keep_outputs`` samples.
        """
        if keep_outputs < 0:
            raise ValueError(f"keep_outputs={keep_outputs} is invalid: use 0 (off) or a positive number of samples")
        self.x = x
        self.model = model
        self.keep_states = keep_states
        self.keep_outputs = int(keep_outputs)
        self._sample_residuals: list[Tensor] = []
        self._sample_phi: list[Tensor] = []
        self._outputs: list[Tensor] = []
        self.states: list[State] = []

    @torch.no_grad()
    def record(self, before: State, after: State) -> None:
        """Store the per-sample residual norm of every layer for the step ``before`` → ``after`` (and Φ(after))."""
        res = [(a - b).flatten(1).norm(dim=1) for a, b in zip(after, before)]
        self._sample_residuals.append(torch.stack(res))
        if self.x is not None and self.model is not None:
            self._sample_phi.append(self.model.phi(self.x, after))
        if self.keep_states:
            if not self.states:
                self.states.append(tuple(s.detach() for s in before))
            self.states.append(tuple(s.detach() for s in after))
        if self.keep_outputs:
            if not self._outputs:
                self._outputs.append(self._output(before))
            self._outputs.append(self._output(after))

    def _output(self, state: State) -> Tensor:
        """The model's prediction (``model.output``: a CE read-out's logits) of every sample; the last state layer
        without a model."""
        out = self.model.output(state) if self.model is not None else state[-1]
        return out.detach().flatten(1).clone()

    def part(self, start: int, stop: int) -> RelaxationTrace:
        """The trace of samples ``start`` … ``stop − 1`` alone (e.g. one half of a doubled batch)."""
        x = self.x[start:stop] if self.x is not None else None
        part = RelaxationTrace(x, self.model, self.keep_states, self.keep_outputs)
        part._sample_residuals = [r[:, start:stop] for r in self._sample_residuals]
        part._sample_phi = [p[start:stop] for p in self._sample_phi]
        part._outputs = [o[start:stop] for o in self._outputs]
        part.states = [tuple(s[start:stop] for s in state) for state in self.states]
        return part

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
        return torch.stack(self._sample_phi).mean(dim=1) if self._sample_phi else torch.empty(0)

    @property
    def outputs(self) -> Tensor:
        """Tensor (steps + 1, keep_outputs, n_out): output at s_0 … s_T of the first samples; empty when not kept."""
        return torch.stack(self._outputs)[:, : self.keep_outputs] if self._outputs else torch.empty(0, 0, 0)


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
    beta: Beta = 0.0,
    target: Tensor | None = None,
    trace: RelaxationTrace | None = None,
    stop: StoppingRule | None = None,
) -> State:
    """Iterate s_{t+1} = step(s_t) ``steps`` times: a free phase without ``target``, a nudged phase toward it with it.

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


class Phases(NamedTuple):
    """The states of one batch's relaxation: s* and, for a nudging pair (β_a, β_b), s_{β_a} and s_{β_b}.

    A β of 0 stands for s* itself (EP's s^0 is the free fixed point, never relaxed again): the one-sided pair (0, β)
    gives (s*, s*, s^β). Without a nudged phase (BPTT, evaluation) both nudged states are None.
    """

    free: State
    nudged_a: State | None = None
    nudged_b: State | None = None


class PhaseTrace:
    """Per-step records of one batch's phases (pass it to ``relax_phases`` or a system's ``phases``).

    After the run: ``free`` and, for each β ≠ 0 of the pair, ``nudged_a`` / ``nudged_b`` (``RelaxationTrace``s with the
    options given here; None where the state is s*), ``betas`` (the pair, None without a nudged phase) and ``phases``
    (the states reached, detached). A doubled relaxation (two non-zero βs) is recorded once and split per half.
    """

    def __init__(self, phi: bool = True, keep_states: bool = False, keep_outputs: int = 0) -> None:
        """
        Args:
            phi: record the batch-mean Φ after every step.
            keep_states: keep every state of every phase.
            keep_outputs: keep the output trajectory (``RelaxationTrace.outputs`` shows this many samples).
        """
        self.record_phi, self.keep_states, self.keep_outputs = bool(phi), bool(keep_states), int(keep_outputs)
        self.free: RelaxationTrace | None = None
        self.nudged_a: RelaxationTrace | None = None
        self.nudged_b: RelaxationTrace | None = None
        self.betas: NudgingPair | None = None
        self.phases: Phases | None = None

    def new(self, x: Tensor, model: EnergyModel) -> RelaxationTrace:
        """An empty ``RelaxationTrace`` with these options for a relaxation of the batch ``x``."""
        return RelaxationTrace(x if self.record_phi else None, model, self.keep_states, self.keep_outputs)

    @property
    def free_steps(self) -> int:
        """Steps the free phase ran (0 before a run)."""
        return self.free.steps if self.free is not None else 0


def relax_phases(
    model: EnergyModel,
    x: Tensor,
    drive: Any,
    start: State,
    steps: int,
    *,
    trace: PhaseTrace | None = None,
    nudged_steps: int = 0,
    betas: NudgingPair | None = None,
    target: Tensor | None = None,
    stop: StoppingRule | None = None,
    graph_steps: int = 0,
) -> Phases:
    """The phases of one batch with the constant ``drive``:

        s*      = relax(``steps`` steps from ``start``)        (the last ``graph_steps`` with autograd: truncated BPTT;
                                                                adaptive with ``stop`` over the steps without graph)
        s_{β}   = relax(``nudged_steps`` steps from s*, β, ``target``)   for each β ≠ 0 of ``betas`` (no graph)

    A β of 0 is s* itself (``Phases``). Two non-zero βs relax as ONE doubled batch: states (s*; s*), target (y; y),
    the drive repeated (``repeat_batch``), per-sample β = (β_b, …, β_a, …). ``x`` is the batch input (only the trace's
    Φ reads it).
    """
    if not 0 <= graph_steps <= steps:
        raise ValueError(f"graph_steps={graph_steps} is invalid: use 0 ≤ graph_steps ≤ steps={steps}")
    free_trace = trace.new(x, model) if trace is not None else None
    with torch.no_grad():
        free = relax(model, drive, start, steps - graph_steps, trace=free_trace, stop=stop)
    if graph_steps:
        free = relax(model, drive, free, graph_steps, trace=free_trace)
    result = Phases(free)
    if betas is not None:
        if target is None:
            raise ValueError("a nudged phase needs a target (the encoded labels)")
        with torch.no_grad():
            result = _nudge(model, x, drive, free, nudged_steps, betas, target, trace)
    if trace is not None:
        trace.free, trace.betas = free_trace, betas
        trace.phases = Phases(*(tuple(s.detach() for s in p) if p is not None else None for p in result))
    return result


def _nudge(
    m: EnergyModel, x: Tensor, drive: Any, free: State, k: int, betas: NudgingPair, y: Tensor, trace: Any
) -> Phases:
    """``Phases(s*, s_{β_a}, s_{β_b})``: K steps from s* at each β ≠ 0 of the pair (see ``relax_phases``)."""
    beta_a, beta_b = betas
    if beta_a == 0.0 or beta_b == 0.0:
        beta = beta_b if beta_a == 0.0 else beta_a
        nudged_trace = trace.new(x, m) if trace is not None else None
        nudged = relax(m, drive, free, k, beta, y, trace=nudged_trace)
        if trace is not None:
            trace.nudged_a, trace.nudged_b = (None, nudged_trace) if beta_a == 0.0 else (nudged_trace, None)
        return Phases(free, free, nudged) if beta_a == 0.0 else Phases(free, nudged, free)
    batch = x.shape[0]
    beta = torch.full((2 * batch, 1), beta_b, dtype=free[0].dtype, device=free[0].device)
    beta[batch:] = beta_a
    doubled_trace = trace.new(torch.cat([x, x]), m) if trace is not None else None
    doubled_state = tuple(torch.cat([s, s]) for s in free)
    doubled = relax(m, repeat_batch(drive, batch), doubled_state, k, beta, torch.cat([y, y]), trace=doubled_trace)
    if trace is not None and doubled_trace is not None:
        trace.nudged_a, trace.nudged_b = doubled_trace.part(batch, 2 * batch), doubled_trace.part(0, batch)
    return Phases(free, tuple(s[batch:] for s in doubled), tuple(s[:batch] for s in doubled))
