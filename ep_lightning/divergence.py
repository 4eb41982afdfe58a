"""NaN/Inf detection of a training step, with a clear error or a skipped batch (used by every system).

Per step, :meth:`DivergenceCheck.check` reduces every tensor that matters — the weights before the update, each
layer of each relaxation phase (free/nudged), each parameter's update (its gradient) — to one scalar, the sum of
their sums, and checks it with one ``torch.isfinite``: one reduction per tensor and a single host sync per step
(the one synchronisation of a training step: the decision must be known before ``optimizer.step()``).
Only when that fails does it look at each tensor to name the culprit (phase, layer or parameter, step) and the
settings that usually cause it (the system's ``divergence_knobs()``: β, learning rates, ε or dt, T, K).

``action='raise'`` (every system's default) stops the run with a :class:`DivergenceError` before
``optimizer.step()``, so the weights stay as they were and no checkpoint of the bad state is written; systems also
refuse to write a checkpoint whose weights are not finite (:func:`check_checkpoint_weights`). ``action='skip'``
(the ``DivergenceGuard`` callback installs such a check) drops the batch (no update); non-finite *weights* cannot be
skipped past and still raise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from ep_lightning.errors import DivergenceError

#: Phases in the order a training step runs them (the first non-finite one is the likely origin).
PHASE_ORDER = ("weights", "free", "nudged", "nudged_a", "update")
DivergenceAction = Literal["raise", "skip"]


class CheckedSystem(Protocol):
    """What the check reads from the system whose training step it checks (every system of ``ep_lightning.systems``)."""

    net: Any
    current_epoch: int
    global_step: int

    def named_parameters(self) -> Any: ...

    def divergence_knobs(self) -> dict[str, Any]: ...

    def all_ranks_agree(self, flag: bool) -> bool: ...


def finite_summary(tensors: Sequence[Tensor]) -> Tensor:
    """Σ_t sum(t): a scalar that is finite iff every entry of every tensor is (NaN and ±Inf propagate through sums;
    Inf − Inf is NaN). Sums whose magnitude overflows (≈ 3e38 in float32) also count as diverged, which they are."""
    with torch.no_grad():
        return torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()


def describe(t: Tensor) -> str:
    """``NaN and Inf (12 of 4096 entries)``, or, for a tensor whose entries are all finite but whose float32 sum
    overflows, ``no NaN/Inf but values up to 3.1e+38 (their sum overflows float32)``."""
    t = t.detach()
    bad = int((~torch.isfinite(t)).sum())
    if bad == 0:
        return f"no NaN/Inf but values up to {float(t.abs().max()):.2g} (their sum overflows float32)"
    kinds = " and ".join(
        k for k, flag in (("NaN", bool(torch.isnan(t).any())), ("Inf", bool(torch.isinf(t).any()))) if flag
    )
    return f"{kinds} ({bad} of {t.numel()} entries)"


def _overflows(t: Tensor) -> bool:
    """True if ``t`` holds NaN/Inf or its float32 sum overflows (what ``finite_summary`` flags)."""
    return not bool(torch.isfinite(t.detach().sum(dtype=torch.float32)))


def knobs_text(knobs: Mapping[str, Any]) -> str:
    """``model.beta=0.5, model.lrs=[0.05, 0.02], …`` for the settings that are set (non-empty, non-zero)."""
    return ", ".join(f"model.{field}={value}" for field, value in knobs.items() if value)


class DivergenceCheck:
    """The per-step decision: apply the update, skip the batch, or stop with a DivergenceError naming the culprit."""

    def __init__(self, action: DivergenceAction = "raise", max_consecutive_skips: int = 20) -> None:
        """
        Args:
            action: ``raise`` stops the run with a DivergenceError naming the layer, step and likely settings;
                ``skip`` drops the bad batch (no update), counts it in ``skipped_batches`` and goes on.
            max_consecutive_skips: in ``skip`` mode, raise anyway after this many bad batches in a row (a run that
                skips everything is not training).
        """
        if action not in ("raise", "skip"):
            raise ValueError(f"DivergenceGuard action={action!r} is not known; allowed: 'raise', 'skip'")
        if max_consecutive_skips < 1:
            raise ValueError(f"DivergenceGuard max_consecutive_skips={max_consecutive_skips} is invalid: use ≥ 1")
        self.action = action
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped_batches = 0
        self.consecutive = 0
        self._parameters: tuple[Any, list[tuple[str, Tensor]]] | None = None

    def check(self, system: CheckedSystem, batch_idx: int, phases: Mapping[str, Sequence[Tensor]]) -> bool:
        """True if the step may apply its update; False (skip mode) if the batch must be dropped; raises otherwise.

        ``phases`` maps a phase name (``free``, ``nudged``) to its state (layers input → output). Call it after
        ``manual_backward`` and before ``optimizer.step()``: the gradients are the update.
        """
        named = self._named_parameters(system)
        params = [p for _, p in named]
        tensors = (
            params + [s for state in phases.values() for s in state] + [p.grad for p in params if p.grad is not None]
        )
        finite = bool(torch.isfinite(finite_summary(tensors)))  # the one host sync per step
        bad: list[tuple[str, str, Tensor]] = []
        if not finite:  # name the culprits; if none, only the total of the sums overflowed: every tensor is fine
            bad = [(phase, name, t) for phase, name, t in self._tensors(system, named, phases) if _overflows(t)]
            finite = not bad
        # all ranks must take the same decision, or skipping on one rank makes replicas drift
        if system.all_ranks_agree(finite):
            self.consecutive = 0
            return True
        if not bad:  # another rank saw the non-finite values
            bad = [("update", "(on another rank)", torch.tensor(float("nan")))]
        weights_bad = any(phase == "weights" for phase, _, _ in bad)
        if self.action == "skip" and not weights_bad and self.consecutive < self.max_consecutive_skips - 1:
            self.consecutive += 1
            self.skipped_batches += 1
            return False
        raise DivergenceError(self._message(system, batch_idx, bad, weights_bad))

    def _named_parameters(self, system: CheckedSystem) -> list[tuple[str, Tensor]]:
        """The system's named parameters, listed once per system (not re-walked every step)."""
        if self._parameters is None or self._parameters[0] is not system:
            self._parameters = (system, list(system.named_parameters()))
        return self._parameters[1]

    @staticmethod
    def _tensors(
        system: CheckedSystem, named: list[tuple[str, Tensor]], phases: Mapping[str, Sequence[Tensor]]
    ) -> list[tuple[str, str, Tensor]]:
        names = system.net.state_names()
        tensors: list[tuple[str, str, Tensor]] = [("weights", n, p) for n, p in named]
        for phase, state in phases.items():
            for i, s in enumerate(state):
                tensors.append((phase, names[i] if i < len(names) else f"state[{i}]", s))
        tensors += [("update", f"{n} (gradient)", p.grad) for n, p in named if p.grad is not None]
        return tensors

    def _message(
        self, system: CheckedSystem, batch_idx: int, bad: list[tuple[str, str, Tensor]], weights_bad: bool
    ) -> str:
        first_phase = min((phase for phase, _, _ in bad), key=lambda p: PHASE_ORDER.index(p) if p in PHASE_ORDER else 9)
        where = "; ".join(f"{phase} {name}: {describe(t)}" for phase, name, t in bad[:6])
        if len(bad) > 6:
            where += f"; … ({len(bad) - 6} more)"
        weights_overflow = all(phase != "weights" or bool(torch.isfinite(t).all()) for phase, _, t in bad)
        why = {
            "weights": "the weights have blown up before this step (an earlier update was too large)"
            if weights_overflow
            else "the weights were already non-finite before this step (an earlier update overflowed)",
            "free": "the free phase diverged (states blow up before any nudging)",
            "nudged": "the nudged phase diverged (β too large for the dynamics, or ε too large for EB models)",
            "nudged_a": "the nudged phase at β_a diverged (β too large for the dynamics, or ε too large for EB models)",
            "update": "the update itself is non-finite (learning rate or 1/β scaling too large)",
        }.get(first_phase, "")
        action = (
            "The update was not applied; no checkpoint of this state is written, the last good checkpoint is kept."
            if not weights_bad
            else "Weights are not usable: this state is not checkpointed; the last good checkpoint is kept."
        )
        hint = (
            " To drop such batches instead, add the callback ep_lightning.callbacks.DivergenceGuard with action: skip."
            if self.action == "raise"
            else ""
        )
        if self.action == "skip" and not weights_bad:
            hint = f" Skip mode gave up after {self.max_consecutive_skips} bad batches in a row."
        return (
            f"training diverged at epoch {system.current_epoch}, batch {batch_idx} (global step {system.global_step}), "
            f"phase '{first_phase}': non-finite values in {where}. Likely origin: {why}. Knobs to lower: "
            f"{knobs_text(system.divergence_knobs())} (β, learning rates, ε; or raise T/K so the phases converge). "
            f"{action}{hint}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": self.skipped_batches, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def check_checkpoint_weights(state_dict: Mapping[str, Any], step: int, knobs: Mapping[str, Any]) -> None:
    """DivergenceError if a floating-point tensor of a checkpoint's ``state_dict`` is not finite (or overflows its
    float32 sum): such a checkpoint is never written, the last good one stays on disk."""
    tensors = [(k, v) for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if tensors and not bool(torch.isfinite(finite_summary([v for _, v in tensors]))):
        bad = [(k, v) for k, v in tensors if _overflows(v)]
        raise DivergenceError(
            f"refusing to save a checkpoint at global step {step}: non-finite weights in "
            + "; ".join(f"{k}: {describe(v)}" for k, v in bad[:6])
            + f". The last good checkpoint is kept. Knobs to lower: {knobs_text(knobs)}."
        )
