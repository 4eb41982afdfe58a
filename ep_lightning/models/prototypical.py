"""Layered fully-connected prototypical (P) networks of any depth (Ernoult et al. 2019, §3.1 and appendix)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ep_lightning.models.activations import ActivationName, get_activation
from ep_lightning.models.base import EnergyModel, State


class PrototypicalNet(EnergyModel):
    """Fully-connected P network with layers ``layers = [n_in, n_1, …, n_out]`` (input → output).

    With h_0 = x and h_n = ``state[n-1]``, the primitive function is

        Φ(x, s, θ) = Σ_n h_{n+1} · (W_n h_n + b_n),

    and the transition (synchronous, all layers from the old state) is

        h_{n+1} ← h_{n+1} + dt · (σ(∂Φ/∂h_{n+1}) − h_{n+1} + [output] β(y − h_out)),
        ∂Φ/∂h_{n+1} = W_n h_n + b_n + W_{n+1}ᵀ h_{n+2}.

    With dt = 1 (the paper) this is h ← σ(∂Φ/∂h), and the nudge is added outside σ as in the authors' code.
    The input drive W_0 x + b_0 is constant during relaxation (``drive``).
    """

    setting = "prototypical"

    def __init__(
        self,
        layers: Sequence[int] = (784, 512, 10),
        activation: ActivationName = "sigmoid",
        dt: float = 1.0,
    ) -> None:
        """
        Args:
            layers: layer sizes from input to output, e.g. ``[784, 512, 10]`` for P-1h.
            activation: σ, one of ``sigmoid`` (the paper's 1/(1+e^{−4(x−½)})), ``hard_sigmoid``, ``tanh``, ``identity``.
            dt: leak of the update, in (0, 1]; 1 is the paper's discrete-time model.
        """
        super().__init__()
        layers = [int(n) for n in layers]
        if len(layers) < 2 or any(n <= 0 for n in layers):
            raise ValueError(
                f"layers={layers} is invalid: give at least [n_in, n_out], every size a positive integer"
            )
        if not (0.0 < dt <= 1.0) or not math.isfinite(dt):
            raise ValueError(f"dt={dt} is invalid: the leak must lie in (0, 1] (the paper uses dt=1)")
        self.layers = layers
        self.activation_name = activation
        self.sigma, _ = get_activation(activation)
        self.dt = float(dt)
        self.num_classes = layers[-1]
        self.synapses = nn.ModuleList(nn.Linear(layers[n], layers[n + 1]) for n in range(len(layers) - 1))

    def init_state_shapes(self) -> list[tuple[int, ...]]:
        return [(n,) for n in self.layers[1:]]

    def init_state(self, x: Tensor) -> State:
        batch = x.shape[0]
        w = self.synapses[0].weight
        return tuple(torch.zeros(batch, n, dtype=w.dtype, device=w.device) for n in self.layers[1:])

    def drive(self, x: Tensor) -> Tensor:
        """W_0 x + b_0, the constant input term of the first layer."""
        return self.synapses[0](x.flatten(1))

    def step(self, state: State, drive: Tensor, beta: float = 0.0, target: Tensor | None = None) -> State:
        last = len(state) - 1
        new_state = []
        for n, h in enumerate(state):
            pre = drive if n == 0 else self.synapses[n](state[n - 1])
            if n < last:
                pre = pre + state[n + 1] @ self.synapses[n + 1].weight
            update = self.sigma(pre) - h
            if n == last and beta != 0.0:
                assert target is not None, "a nudged step needs a target"
                update = update + beta * self.nudge(state, target)
            new_state.append(h + self.dt * update if self.dt != 1.0 else h + update)
        return tuple(new_state)

    def phi(self, x: Tensor, state: State) -> Tensor:
        """Φ(x, s, θ) = Σ_n h_{n+1} · (W_n h_n + b_n) per sample."""
        below = x.flatten(1)
        total = x.new_zeros(x.shape[0], dtype=state[0].dtype)
        for synapse, h in zip(self.synapses, state):
            total = total + (h * synapse(below)).sum(dim=1)
            below = h
        return total

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        return [list(synapse.parameters()) for synapse in self.synapses]
