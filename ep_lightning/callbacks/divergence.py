"""DivergenceGuard: NaN/Inf detection every training step, with a clear error or a skipped batch.

Per step, :func:`check_training_step` reduces every tensor that matters — the weights before the update, each
layer of each relaxation phase (free/nudged), each parameter's update (its gradient) — to one scalar, the sum of
their sums, and checks it with one ``torch.isfinite``: one reduction per tensor and a single host sync per step
(the one synchronisation of a training step: the decision must be known before ``optimizer.step()``).
Only when that fails does it look at each tensor to name the culprit (phase, layer or parameter, step) and the
settings that usually cause it (β, learning rates, ε, T, K).

``action='raise'`` (the default, also used when no guard is configured) stops the run with a
:class:`DivergenceError` before ``optimizer.step()``, so the weights stay as they were and no checkpoint of the bad
state is written; the guard also refuses to write a checkpoint whose weights are not finite. ``action='skip'``
drops the batch (no update) and logs ``train/skipped_batches``; non-finite *weights* cannot be skipped past and
still raise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from ep_lightning.errors import DivergenceError
from ep_lightning.protocols import RelaxingSystem

#: Phases in the order a training step runs them (the first non-finite one is the likely origin).
PHASE_ORDER = ("weights", "free", "nudged", "nudged_a", "update")


def _finite_summary(tensors: Sequence[Tensor]) -> Tensor:
    """Σ_t sum(t): a scalar that is finite iff every entry of every tensor is (NaN and ±Inf propagate through sums;
    Inf − Inf is NaN). Sums whose magnitude overflows (≈ 3e38 in float32) also count as diverged, which they are."""
    with torch.no_grad():
        return torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()


def _describe(t: Tensor) -> str:
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    kinds = " and ".join(k for k, flag in (("NaN", nan), ("Inf", inf)) if flag) or "overflowing values"
    return f"{kinds} ({int((~torch.isfinite(t)).sum())} of {t.numel()} entries)"


def _knobs(module: RelaxingSystem) -> str:
    """The settings that usually cause divergence, with their current values."""
    parts = [
        f"model.{field}={value}"
        for field, value in (("beta", module.beta), ("lrs", module.lrs), ("T", module.T), ("K", module.K))
        if value
    ]
    for field in ("eps", "dt"):  # the step sizes of EB and P nets (model-specific hyperparameters)
        value = getattr(module.net, field, None)
        if value is not None:
            parts.append(f"model.net.{field}={value}")
    return ", ".join(parts)


class DivergenceGuard(L.Callback):
    """Stops (or skips a batch) when NaN/Inf appears in weights, relaxation states or the update.

    Add it to ``trainer.callbacks`` to choose the action; without it, every system uses a raising guard.
    """

    def __init__(self, action: Literal["raise", "skip"] = "raise", max_consecutive_skips: int = 20) -> None:
        """
        Args:
            action: ``raise`` stops the run with a DivergenceError naming the layer, step and likely settings;
                ``skip`` drops the bad batch (no update), counts it in ``train/skipped_batches`` and goes on.
            max_consecutive_skips: in ``skip`` mode, raise anyway after this many bad batches in a row (a run that
                skips everything is not training).
        """
        super().__init__()
        if action not in ("raise", "skip"):
            raise ValueError(f"DivergenceGuard action={action!r} is not known; allowed: 'raise', 'skip'")
        if max_consecutive_skips < 1:
            raise ValueError(f"DivergenceGuard max_consecutive_skips={max_consecutive_skips} is invalid: use ≥ 1")
        self.action = action
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped_batches = 0
        self._consecutive = 0

    # --- the per-step check ----------------------------------------------------------------------------------
    def check(self, module: Any, batch_idx: int, phases: Mapping[str, Sequence[Tensor]]) -> bool:
        """True if the step may apply its update; False (skip mode) if the batch must be dropped; raises otherwise.

        ``phases`` maps a phase name (``free``, ``nudged``) to its state (layers input → output). Call it after
        ``manual_backward`` and before ``optimizer.step()``: the gradients are the update.
        """
        params = self._parameters(module)
        tensors = (
            params + [s for state in phases.values() for s in state] + [p.grad for p in params if p.grad is not None]
        )
        finite = bool(torch.isfinite(_finite_summary(tensors)))  # the one host sync per step
        trainer = getattr(module, "_trainer", None)
        distributed = trainer is not None and trainer.world_size > 1
        if distributed:  # all ranks must take the same decision, or skipping on one rank makes replicas drift
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            self._consecutive = 0
            return True
        named = self._named_tensors(module, phases)
        bad = [(phase, name, t) for phase, name, t in named if not bool(torch.isfinite(t.detach().sum()))]
        if not bad and not distributed:  # only the float32 total overflowed: every tensor is finite
            self._consecutive = 0
            return True
        if not bad:  # another rank saw the non-finite values
            bad = [("update", "(on another rank)", torch.tensor(float("nan")))]
        weights_bad = any(phase == "weights" for phase, _, _ in bad)
        if self.action == "skip" and not weights_bad and self._consecutive < self.max_consecutive_skips - 1:
            self._consecutive += 1
            self.skipped_batches += 1
            return False
        raise DivergenceError(self._message(module, batch_idx, bad, weights_bad))

    def _parameters(self, module: Any) -> list[Tensor]:
        """The module's parameters, listed once per module (not re-walked every step)."""
        cached = getattr(self, "_cached_parameters", None)
        if cached is None or cached[0] is not module:
            self._cached_parameters = cached = (module, list(module.parameters()))
        return cached[1]

    @staticmethod
    def _named_tensors(module: Any, phases: Mapping[str, Sequence[Tensor]]) -> list[tuple[str, str, Tensor]]:
        names = module.net.state_names()
        named: list[tuple[str, str, Tensor]] = []
        params = [(n, p) for n, p in module.named_parameters()]
        named += [("weights", n, p) for n, p in params]
        for phase, state in phases.items():
            for i, s in enumerate(state):
                named.append((phase, names[i] if i < len(names) else f"state[{i}]", s))
        named += [("update", f"{n} (gradient)", p.grad) for n, p in params if p.grad is not None]
        return named

    def _message(self, module: Any, batch_idx: int, bad: list[tuple[str, str, Tensor]], weights_bad: bool) -> str:
        first_phase = min((phase for phase, _, _ in bad), key=lambda p: PHASE_ORDER.index(p) if p in PHASE_ORDER else 9)
        where = "; ".join(f"{phase} {name}: {_describe(t)}" for phase, name, t in bad[:6])
        if len(bad) > 6:
            where += f"; … ({len(bad) - 6} more)"
        trainer = getattr(module, "_trainer", None)
        epoch = getattr(trainer, "current_epoch", "?") if trainer is not None else "?"
        step = getattr(module, "global_step", "?") if trainer is not None else "?"
        why = {
            "weights": "the weights were already non-finite before this step (an earlier update overflowed)",
            "free": "the free phase diverged (states blow up before any nudging)",
            "nudged": "the nudged phase diverged (β too large for the dynamics, or ε too large for EB models)",
            "nudged_a": "the nudged phase at β_a diverged (β too large for the dynamics, or ε too large for EB models)",
            "update": "the update itself is non-finite (learning rate or 1/β scaling too large)",
        }.get(first_phase, "")
        action = (
            "The update was not applied; no checkpoint of this state is written, the last good checkpoint is kept."
            if not weights_bad
            else "Weights are not finite: this state is not checkpointed; the last good checkpoint is kept."
        )
        hint = (
            ""
            if self.action == "skip"
            else " To drop such batches instead, add the callback "
            "ep_lightning.callbacks.DivergenceGuard with action: skip."
        )
        if self.action == "skip" and not weights_bad:
            hint = f" Skip mode gave up after {self.max_consecutive_skips} bad batches in a row."
        return (
            f"training diverged at epoch {epoch}, batch {batch_idx} (global step {step}), phase '{first_phase}': "
            f"non-finite values in {where}. Likely origin: {why}. Knobs to lower: {_knobs(module)} (β, learning "
            f"rates, ε; or raise T/K so the phases converge). {action}{hint}"
        )

    # --- Lightning hooks -------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint whose weights are not finite (the last good one stays on disk)."""
        state = checkpoint.get("state_dict", {})
        tensors = [(k, v) for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()]
        if tensors and not bool(torch.isfinite(_finite_summary([v for _, v in tensors]))):
            bad = [(k, v) for k, v in tensors if not bool(torch.isfinite(v.sum()))]
            raise DivergenceError(
                f"refusing to save a checkpoint at global step {trainer.global_step}: non-finite weights in "
                + "; ".join(f"{k}: {_describe(v)}" for k, v in bad[:6])
                + f". The last good checkpoint is kept. Knobs to lower: {_knobs(pl_module)}."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": self.skipped_batches, "consecutive": self._consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))
        self._consecutive = int(state_dict.get("consecutive", 0))


#: Used when the trainer has no DivergenceGuard: raise on the first non-finite value.
_DEFAULT_GUARD = DivergenceGuard(action="raise")


def find_guard(module: Any) -> DivergenceGuard:
    """The trainer's DivergenceGuard, or a raising one when none is configured (or there is no trainer)."""
    trainer = getattr(module, "_trainer", None)
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, DivergenceGuard):
            return callback
    return _DEFAULT_GUARD


def check_training_step(module: Any, batch_idx: int, phases: Mapping[str, Sequence[Tensor]]) -> bool:
    """Call between ``manual_backward`` and ``optimizer.step()``: True to step, False to skip this batch (the
    gradients are zeroed), DivergenceError to stop. See :class:`DivergenceGuard`."""
    ok = find_guard(module).check(module, batch_idx, phases)
    if not ok:
        module.zero_grad(set_to_none=True)
    return ok


def default_callbacks(module: Any) -> list[L.Callback]:
    """For ``configure_callbacks``: a raising DivergenceGuard unless the trainer already has one (whose settings
    must not be replaced), so that bad checkpoints are refused in every run."""
    trainer = getattr(module, "_trainer", None)
    if any(isinstance(c, DivergenceGuard) for c in getattr(trainer, "callbacks", None) or []):
        return []
    return [DivergenceGuard(action="raise")]
