"""Activation functions σ (and their derivatives σ') used by the convergent networks.

Names are the ones accepted in configs (`activation: sigmoid`):

- ``sigmoid``: the paper's shifted, steepened logistic σ(x) = 1 / (1 + exp(−4(x − ½))), range (0, 1);
- ``hard_sigmoid``: σ(x) = clamp(x, 0, 1);
- ``tanh``: σ(x) = tanh(x);
- ``identity``: σ(x) = x (linear networks, used for exact checks of the theory);
- ``half_slope_hard_sigmoid``: σ(x) = clamp(x/2, 0, 1), slope ½ on [0, 2];
- ``centered_hard_sigmoid``: σ(x) = clamp(x, −½, ½);
- ``logistic``: σ(x) = 1 / (1 + exp(−x)) (the plain logistic function, ``torch.sigmoid``).

Laborieux et al.'s code (``model_utils.py`` / ``main.py --act``) names them differently; their name → ours:
``my_hard_sig`` (1 + hardtanh(x − 1))/2 → ``half_slope_hard_sigmoid``; ``hard_sigmoid`` (1 + hardtanh(2x − 1))/2
→ ``hard_sigmoid`` (the same function); ``ctrd_hard_sig`` hardtanh(2x)/2 → ``centered_hard_sigmoid``; ``mysig``
(``my_sigmoid``) → ``sigmoid``; ``sigmoid`` (``torch.sigmoid``) → ``logistic``; ``tanh`` → ``tanh``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

ActivationName = Literal[
    "sigmoid", "hard_sigmoid", "tanh", "identity", "half_slope_hard_sigmoid", "centered_hard_sigmoid", "logistic"
]


def sigmoid(x: Tensor) -> Tensor:
    """σ(x) = 1 / (1 + exp(−4(x − ½)))."""
    return torch.sigmoid(4.0 * (x - 0.5))


def sigmoid_derivative(x: Tensor) -> Tensor:
    """σ'(x) = 4 σ(x)(1 − σ(x))."""
    s = sigmoid(x)
    return 4.0 * s * (1.0 - s)


def hard_sigmoid(x: Tensor) -> Tensor:
    """σ(x) = clamp(x, 0, 1)."""
    return x.clamp(0.0, 1.0)


def hard_sigmoid_derivative(x: Tensor) -> Tensor:
    """σ'(x) = 1 on [0, 1], 0 elsewhere (the authors' convention at the kinks)."""
    return ((x >= 0) & (x <= 1)).to(x.dtype)


def half_slope_hard_sigmoid(x: Tensor) -> Tensor:
    """σ(x) = clamp(x/2, 0, 1) = (1 + hardtanh(x − 1))/2."""
    return (0.5 * x).clamp(0.0, 1.0)


def half_slope_hard_sigmoid_derivative(x: Tensor) -> Tensor:
    """σ'(x) = ½ on [0, 2], 0 elsewhere."""
    return 0.5 * ((x >= 0) & (x <= 2)).to(x.dtype)


def centered_hard_sigmoid(x: Tensor) -> Tensor:
    """σ(x) = clamp(x, −½, ½) = hardtanh(2x)/2."""
    return x.clamp(-0.5, 0.5)


def centered_hard_sigmoid_derivative(x: Tensor) -> Tensor:
    """σ'(x) = 1 on [−½, ½], 0 elsewhere."""
    return ((x >= -0.5) & (x <= 0.5)).to(x.dtype)


def logistic_derivative(x: Tensor) -> Tensor:
    """σ'(x) = σ(x)(1 − σ(x)) for σ = 1/(1 + e^{−x})."""
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def tanh_derivative(x: Tensor) -> Tensor:
    """σ'(x) = 1 − tanh²(x)."""
    return 1.0 - torch.tanh(x) ** 2


def identity(x: Tensor) -> Tensor:
    """σ(x) = x."""
    return x


def identity_derivative(x: Tensor) -> Tensor:
    """σ'(x) = 1."""
    return torch.ones_like(x)


ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "sigmoid": (sigmoid, sigmoid_derivative),
    "hard_sigmoid": (hard_sigmoid, hard_sigmoid_derivative),
    "tanh": (torch.tanh, tanh_derivative),
    "identity": (identity, identity_derivative),
    "half_slope_hard_sigmoid": (half_slope_hard_sigmoid, half_slope_hard_sigmoid_derivative),
    "centered_hard_sigmoid": (centered_hard_sigmoid, centered_hard_sigmoid_derivative),
    "logistic": (torch.sigmoid, logistic_derivative),
}

#: (lower, upper) bounds of each activation's range, used to measure saturation.
ACTIVATION_BOUNDS: dict[str, tuple[float, float] | None] = {
    "sigmoid": (0.0, 1.0),
    "hard_sigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
    "identity": None,
    "half_slope_hard_sigmoid": (0.0, 1.0),
    "centered_hard_sigmoid": (-0.5, 0.5),
    "logistic": (0.0, 1.0),
}


class FusedActivation(NamedTuple):
    """σ(z) = g(a·z + c) with g applied in place: lets a layer compute σ(W h + b) as g_(addmm(a·b + c, h, Wᵀ, alpha=a)),
    two kernels instead of five. ``inplace`` is None for the identity."""

    scale: float
    shift: float
    inplace: Callable[[Tensor], Tensor] | None


FUSED: dict[str, FusedActivation] = {
    "sigmoid": FusedActivation(4.0, -2.0, torch.sigmoid_),  # σ(z) = logistic(4z − 2)
    "hard_sigmoid": FusedActivation(1.0, 0.0, lambda t: t.clamp_(0.0, 1.0)),
    "tanh": FusedActivation(1.0, 0.0, torch.tanh_),
    "identity": FusedActivation(1.0, 0.0, None),
    "half_slope_hard_sigmoid": FusedActivation(0.5, 0.0, lambda t: t.clamp_(0.0, 1.0)),  # σ(z) = clamp(z/2, 0, 1)
    "centered_hard_sigmoid": FusedActivation(1.0, 0.0, lambda t: t.clamp_(-0.5, 0.5)),
    "logistic": FusedActivation(1.0, 0.0, torch.sigmoid_),
}


def get_activation(name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Return (σ, σ') for a config name, or raise a ValueError listing the allowed names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not known; allowed: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def activation_and_scaled_derivative(name: str, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """(σ(x), σ'(x)/k, k) with the constant k left for the caller to fold into a later coefficient (one kernel fewer
    per layer and step): k = 4 and σ'/k = σ(1 − σ) for the paper's sigmoid σ(x) = logistic(4x − 2), k = ½ and σ'/k
    the indicator of [0, 2] for ``half_slope_hard_sigmoid``, k = 1 otherwise."""
    if name == "sigmoid":
        value = torch.rsub(x, -2.0, alpha=-4.0).sigmoid_()  # −2 − (−4)x = 4x − 2 in one kernel, same rounding
        return value, torch.addcmul(value, value, value, value=-1.0), 4.0
    if name == "hard_sigmoid":
        value = x.clamp(0.0, 1.0)
        return value, (value == x).to(x.dtype), 1.0  # 1 on [0, 1] (kinks included), 0 outside
    if name == "tanh":
        value = torch.tanh(x)
        return value, torch.addcmul(torch.ones_like(value), value, value, value=-1.0), 1.0
    if name == "identity":
        return x, torch.ones_like(x), 1.0
    if name == "half_slope_hard_sigmoid":
        value = (0.5 * x).clamp(0.0, 1.0)
        return value, ((x >= 0) & (x <= 2)).to(x.dtype), 0.5  # σ' = ½ on [0, 2] (kinks included)
    if name == "centered_hard_sigmoid":
        value = x.clamp(-0.5, 0.5)
        return value, (value == x).to(x.dtype), 1.0
    if name == "logistic":
        value = torch.sigmoid(x)
        return value, torch.addcmul(value, value, value, value=-1.0), 1.0
    raise ValueError(f"activation={name!r} is not known; allowed: {', '.join(sorted(ACTIVATIONS))}")


def get_fused_activation(name: str) -> FusedActivation:
    """The (a, c, g_) form of σ for a config name (see ``FusedActivation``)."""
    get_activation(name)  # validates the name
    return FUSED[name]
