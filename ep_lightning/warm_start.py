"""Warm starts: the last free-phase state of every training example, reused as its next initial state
(persistent fixed points, Scellier & Bengio 2017).

Memory: N × Σ_l (units of layer l) values in the net's dtype, on the training device. The table is
allocated at the first training batch (sized from the dataset when known) and saved in checkpoints (moved to CPU),
so a resumed run continues from exactly the same states.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ep_lightning.models.base import State


class PersistentStates:
    """Per-example state table indexed by the dataset index of each training sample."""

    def __init__(self) -> None:
        self.states: list[Tensor] | None = None
        #: seen[i]: example i has a stored state (examples not seen yet start from the model's ``init_state``).
        self.seen: Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.seen is None else int(self.seen.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the table, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.states or [])

    def _ensure(self, index: Tensor, like: State, size_hint: int | None) -> None:
        """Allocate (or grow) the table to hold the examples ``index``, on ``like``'s device and dtype.

        With ``size_hint`` (the dataset size; every index is below it) the indices are never inspected: no host
        synchronisation. Without it the table grows to the largest index seen."""
        device = like[0].device
        if self.states is not None and (self.states[0].device != device or self.states[0].dtype != like[0].dtype):
            self.states = [t.to(device=device, dtype=like[0].dtype) for t in self.states]
            self.seen = self.seen.to(device)
        if size_hint is not None and self.capacity >= size_hint:
            return
        needed = size_hint if size_hint is not None else int(index.max()) + 1
        if needed <= self.capacity:
            return
        size = max(needed, size_hint or 0, math.ceil(1.25 * self.capacity))
        new_states = [s.new_zeros(size, *s.shape[1:]) for s in like]
        new_seen = torch.zeros(size, dtype=torch.bool, device=device)
        if self.states is not None:
            for new, old in zip(new_states, self.states):
                new[: old.shape[0]] = old
            new_seen[: self.capacity] = self.seen
        self.states, self.seen = new_states, new_seen

    def start(self, index: Tensor, init: State, size_hint: int | None = None) -> State:
        """The initial state of the batch: the stored state of each example seen before, ``init`` otherwise."""
        index = index.to(device=init[0].device, dtype=torch.long)
        self._ensure(index, init, size_hint)
        assert self.states is not None and self.seen is not None
        seen = self.seen[index]
        return tuple(
            torch.where(seen.view(-1, *([1] * (s.dim() - 1))), table[index], s) for s, table in zip(init, self.states)
        )

    def store(self, index: Tensor, state: State) -> None:
        """Remember ``state`` (detached) as the next initial state of the examples ``index``."""
        assert self.states is not None and self.seen is not None, "call start() before store()"
        index = index.to(device=self.seen.device, dtype=torch.long)
        with torch.no_grad():
            for table, s in zip(self.states, state):
                table[index] = s.detach().to(table.dtype)
            self.seen[index] = True

    def state_dict(self) -> dict[str, Any]:
        if self.states is None or self.seen is None:
            return {}
        return {"states": [t.cpu() for t in self.states], "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a table saved by ``state_dict`` (it moves to the training device at the next ``start``)."""
        if not state:
            self.states, self.seen = None, None
            return
        self.states = [t.clone() for t in state["states"]]
        self.seen = state["seen"].clone()
