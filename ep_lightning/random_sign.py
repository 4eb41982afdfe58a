"""The random sign of β (Laborieux et al. 2021; O'Connor et al. 2019): a dedicated, seeded, picklable coin.

One draw per training step from a ``torch.Generator`` seeded with the run seed gives every DDP rank the same sign
(same seed, same number of draws), never touches the global RNG (so the data order and initialisation do not
depend on the nudging variant), and its state goes into checkpoints so a resumed run continues the same sequence.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor


def run_seed(default: int = 0) -> int:
    """The run seed ($PL_GLOBAL_SEED, set by ``seed_everything``), else ``default``."""
    env = os.environ.get("PL_GLOBAL_SEED", "")
    return int(env) if env.lstrip("-").isdigit() else int(default)


class SignGenerator:
    """A ``torch.Generator`` for the β sign that pickles its state as bytes.

    A bare ``torch.Generator`` does not pickle, and a tensor state sent by ``torch.multiprocessing`` (``ddp_spawn``)
    goes through shared memory; bytes travel safely.
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
