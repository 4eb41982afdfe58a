"""Opt-in compilation of a training step's relaxation phases (``EnergySystem.phases``; ``model.compile_relaxation``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.exc import TorchDynamoException

from ep_lightning.errors import ConfigError


class CompiledPhases:
    """``torch.compile`` of a function running the input drive and the free and nudged relaxations of one batch.

    The T + K steps unroll into one graph, so the compiler fuses each step's element-wise work and, on CUDA, replays
    the whole relaxation as one CUDA graph (``mode="reduce-overhead"``: small-batch relaxation is kernel-launch
    bound there); on CPU inductor's C++ wrapper removes the per-kernel Python dispatch. A batch shape or a β value
    not seen before compiles once more (random-sign nudging: two values). Outputs are cloned on CUDA, since CUDA-graph
    outputs are overwritten by the next replay. A compilation failure (no C++ compiler, an unsupported op) becomes a
    ``ConfigError`` that names the option to turn off.
    """

    def __init__(self, phases: Callable[..., Any], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compiled = torch.compile(phases, mode="reduce-overhead")
        else:
            self.compiled = torch.compile(phases, options={"cpp_wrapper": True})

    def __call__(self, *args: Any) -> Any:
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = self.compiled(*args)
        except TorchDynamoException as err:  # tracing or backend failure (e.g. InvalidCxxCompiler), not the math
            raise ConfigError(
                f"model.compile_relaxation=true: torch.compile failed ({type(err).__name__}: {str(err)[:300]}); "
                "set model.compile_relaxation=false (the eager relaxation computes the same update)"
            ) from err
        if self.cuda:  # the phases (a NamedTuple of states) with every tensor cloned
            out = type(out)(*(tuple(s.clone() for s in state) if state is not None else None for state in out))
        return out
