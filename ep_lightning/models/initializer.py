"""The Initialized-EP feedforward initializer f_φ (O'Connor, Gavves & Welling, ICLR 2019).

A plain MLP with the layer sizes of the equilibrating network and its own weights. It predicts the fixed point of
the energy model layer by layer, so that the free (negative) phase can start next to s* and, once trained, it
classifies on its own without any relaxation. It is an ordinary ``nn.Module``: no Lightning needed to use it
(``FeedforwardInitializer.from_checkpoint`` extracts it from a training checkpoint).

Layer order is input → output, like the energy models: ``forward(x)[-1]`` is the output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ep_lightning.checkpoints import INITIALIZER_CONFIG_KEY
from ep_lightning.models.base import State
from ep_lightning.models.layered import check_layers, make_synapses


def leaky_hard_sigmoid(z: Tensor, leak: float) -> Tensor:
    """ρ_f(z) = clamp(z, 0, 1) + leak · z (the authors' ``rho(x)+0.01*x``)."""
    return z.clamp(0.0, 1.0) + leak * z


def leaky_hard_sigmoid_derivative(z: Tensor, leak: float) -> Tensor:
    """ρ_f'(z) = 1{0 ≤ z ≤ 1} + leak (the kinks count as inside, as autograd's clamp does)."""
    return ((z >= 0) & (z <= 1)).to(z.dtype) + leak


class FeedforwardInitializer(nn.Module):
    """f_φ with layers ``[n_in, n_1, …, n_out]``:  s^f_0 = x,  z_l = ω_l s^f_{l−1} + c_l,  s^f_l = ρ_f(z_l).

    Trained by the layer-local "contrast" loss to the negative-phase state s⁻ of the energy model,

        L_l(φ_l) = mean_batch ½‖s^f_l − s⁻_l‖²,   with s^f_{l−1} detached (``local=True``),

    whose gradient is the delta rule ∇_{ω_l} L_l = (1/B) s^f_{l−1}ᵀ[(s^f_l − s⁻_l) ⊙ ρ_f'(z_l)]: no gradient crosses
    layers. ``local=False`` keeps the graph between layers (the global, back-propagated loss, for comparison).
    Weights are Xavier-uniform, biases zero (the authors' initialisation).
    """

    def __init__(self, layers: Sequence[int] = (784, 500, 10), leak: float = 0.01) -> None:
        """
        Args:
            layers: layer sizes from input to output; must match the energy model's (e.g. ``[784, 500, 10]``).
            leak: slope of ρ_f outside [0, 1] (0.01 in the paper; 0 gives the plain hard sigmoid).
        """
        super().__init__()
        layers = check_layers(layers, "initializer.layers")
        if not 0.0 <= leak < 1.0:
            raise ValueError(f"initializer.leak={leak} is invalid: use a slope in [0, 1) (the paper uses 0.01)")
        self.layers = layers
        self.leak = float(leak)
        self.synapses = make_synapses(layers)
        self.reset_parameters()

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (``FeedforwardInitializer(**init_args)`` builds the same network)."""
        return {"layers": list(self.layers), "leak": self.leak}

    def reset_parameters(self) -> None:
        """Xavier-uniform weights (U(±√(6/(n_in + n_out)))), zero biases."""
        for synapse in self.synapses:
            nn.init.xavier_uniform_(synapse.weight)
            nn.init.zeros_(synapse.bias)

    def preactivations_and_states(self, x: Tensor, local: bool = True) -> tuple[list[Tensor], State]:
        """(z_1 … z_L, s^f_1 … s^f_L); with ``local`` each layer reads the previous one detached."""
        below = x.flatten(1)
        pre, states = [], []
        for n, synapse in enumerate(self.synapses):
            z = synapse(below.detach() if local and n > 0 else below)
            below = leaky_hard_sigmoid(z, self.leak)
            pre.append(z)
            states.append(below)
        return pre, tuple(states)

    def forward(self, x: Tensor, local: bool = True) -> State:
        """s^f = f_φ(x), one tensor per layer (input → output). ``local`` only changes how gradients flow."""
        return self.preactivations_and_states(x, local)[1]

    def layer_losses(self, x: Tensor, target: State, local: bool = True) -> list[Tensor]:
        """[L_1, …, L_L] with L_l = mean_batch ½‖s^f_l − s⁻_l‖² (targets detached)."""
        states = self.forward(x, local)
        return layer_contrast_losses(states, target)

    def contrast_loss(self, x: Tensor, target: State, local: bool = True) -> Tensor:
        """Σ_l L_l, the authors' "contrast" loss; with ``local`` its gradient on φ_l is the delta rule of layer l."""
        return torch.stack(self.layer_losses(x, target, local)).sum()

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> FeedforwardInitializer:
        """Extract the trained f_φ from a Lightning checkpoint of ``InitializedEP`` or ``InitializerDistillation``.

        Layer sizes come from the weight shapes, the leak from the checkpoint's ``initializer_config`` entry.
        """
        checkpoint = torch.load(
            path, map_location=map_location, weights_only=False
        )  # our own file: hparams hold callables
        prefix = "initializer."
        state = {k[len(prefix) :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"checkpoint {path} holds no initializer weights (no 'initializer.*' entries)")
        count = len([k for k in state if k.endswith(".weight")])
        weights = [state[f"synapses.{n}.weight"] for n in range(count)]
        layers = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        leak = checkpoint.get(INITIALIZER_CONFIG_KEY, {}).get("leak", 0.01)
        initializer = cls(layers, leak=leak)
        initializer.load_state_dict(state)
        return initializer


def layer_contrast_losses(states: State, target: State) -> list[Tensor]:
    """L_l = mean_batch ½‖s_l − t_l‖² for every layer, with the targets t detached."""
    return [0.5 * (s - t.detach()).pow(2).flatten(1).sum(dim=1).mean() for s, t in zip(states, target)]
