"""What the monitors measure of a batch's relaxation (pure functions and records, tested on their own).

The residual of sample i at step t is r_t(i) = (Σ_l ‖s^l_t(i) − s^l_{t−1}(i)‖²)^½; ``steps_to_tolerance`` is the first
t at which the batch mean of r_t falls under the tolerance (steps + 1 when it never does); ``unconverged_fraction``
is the share of samples with r_T(i) ≥ tolerance at the end of a phase; saturation is the share of units within a
margin (a fraction of σ's range width) of a bound of σ's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ep_lightning.figures import PhaseCurves
from ep_lightning.models.base import State
from ep_lightning.models.nudging import NudgingPair
from ep_lightning.relaxation import Phases, PhaseTrace, RelaxationTrace

#: Name used in tags for the residual of the whole state, r_t(i) = (Σ_l ‖s^l_t(i) − s^l_{t−1}(i)‖²)^½ (batch mean).
WHOLE_STATE = "whole_state"


def steps_to_tolerance(residual: Tensor, tolerance: float) -> int:
    """First t ∈ {1 … n} with residual[t − 1] < tolerance, or n + 1 when there is none (``residual``: shape (n,))."""
    below = (residual < tolerance).nonzero()
    return int(below[0, 0]) + 1 if below.numel() else int(residual.shape[0]) + 1


def unconverged_fraction(final_residual: Tensor, tolerance: float) -> float:
    """Share of samples whose last-step residual r_T(i) is still ≥ tolerance (``final_residual``: shape (batch,))."""
    return float((final_residual >= tolerance).to(torch.float64).mean()) if final_residual.numel() else 0.0


def saturation_fraction(state: Tensor, bounds: tuple[float, float], margin: float) -> float:
    """Share of units with s ≤ lo + m(hi − lo) or s ≥ hi − m(hi − lo), for σ's range (lo, hi) and margin m."""
    lo, hi = bounds
    width = margin * (hi - lo)
    return float(((state <= lo + width) | (state >= hi - width)).to(torch.float64).mean())


@dataclass
class PhaseRecord:
    """What one relaxation phase looked like on the monitored batch (curves on the CPU)."""

    phase: str  # "free", "nudged" (at β_b) or "nudged_a" (at β_a, when it is relaxed)
    residuals: Tensor  # (steps, layers): batch-mean per-layer residual
    total: Tensor  # (steps,): batch mean of the whole-state residual r_t(i)
    final: Tensor  # (batch,): r_steps(i), per sample
    phi: Tensor  # (steps,): batch-mean Φ after each step
    outputs: Tensor  # (steps + 1, samples, n_out): output trajectory of the first samples
    state: State  # the state reached (on the model's device)
    steps_to_tol: int

    def curves(self) -> PhaseCurves:
        """The part ``figures.relaxation_figure`` draws."""
        return PhaseCurves(self.phase, self.residuals, self.total, self.phi, self.steps_to_tol)


@dataclass
class Snapshot:
    """The phases of one monitored batch, as the system relaxed them: a record per phase (``nudged``/``nudged_a``:
    None when not relaxed), the pair (None without a nudged phase) and the states reached (``relaxation.Phases``)."""

    x: Tensor
    labels: Tensor
    names: list[str]
    free: PhaseRecord
    nudged: PhaseRecord | None
    nudged_a: PhaseRecord | None = None
    betas: NudgingPair | None = None
    states: Phases | None = None

    def records(self) -> list[PhaseRecord]:
        """The phases in the order they ran: free, then the nudged one(s)."""
        return [rec for rec in (self.free, self.nudged_a, self.nudged) if rec is not None]


def phase_record(phase: str, trace: RelaxationTrace, state: State, tolerance: float, samples: int) -> PhaseRecord:
    """The record of the first ``samples`` samples of a traced phase."""
    trace = trace.part(0, samples)
    total = trace.total_residuals.detach().cpu()  # (steps, batch)
    mean_total = total.mean(dim=1)
    return PhaseRecord(
        phase=phase,
        residuals=trace.residuals.detach().cpu(),
        total=mean_total,
        final=total[-1] if total.numel() else torch.empty(0),
        phi=trace.phi.detach().cpu(),
        outputs=trace.outputs.detach().cpu(),
        state=tuple(s[:samples] for s in state),
        steps_to_tol=steps_to_tolerance(mean_total, tolerance),
    )


def snapshot_of(trace: PhaseTrace, x: Tensor, labels: Tensor, names: list[str], tolerance: float) -> Snapshot:
    """The snapshot of a filled ``PhaseTrace`` of the batch (x, labels) (at most its first ``x.shape[0]`` samples)."""
    assert trace.free is not None and trace.phases is not None, "the trace was not filled by a relaxation"
    n = x.shape[0]
    states = Phases(*(tuple(s[:n] for s in state) if state is not None else None for state in trace.phases))
    free = phase_record("free", trace.free, states.free, tolerance, n)
    nudged = nudged_a = None
    if trace.nudged_b is not None and states.nudged_b is not None:
        nudged = phase_record("nudged", trace.nudged_b, states.nudged_b, tolerance, n)
    if trace.nudged_a is not None and states.nudged_a is not None:
        nudged_a = phase_record("nudged_a", trace.nudged_a, states.nudged_a, tolerance, n)
    return Snapshot(x, labels, names, free, nudged, nudged_a, trace.betas, states)
