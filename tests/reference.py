"""Autograd reference of one step of every model, independent of the models' closed-form ``step``.

Each function derives the update from the model's scalar Φ (``phi``), energy E (``energy``) and cost ℓ (``cost``) by
autograd, so a test comparing ``model.step`` with it checks the hand-written dynamics against the scalar functions:

- prototypical (P nets, P-conv):  s ← s + dt(σ(∂Φ/∂s [+ β(−∂ℓ/∂s) for a ce read-out]) − s) [+ dt β(−∂ℓ/∂s_out) for mse];
- energy-based:  s ← clamp(s − ε ∂(E + (λ/2)‖s − s^f‖² + βℓ)/∂s), where with ``output_dynamics='linear'`` the output
  layer's E is replaced by ½‖s_out‖² − s_out·(W ρ(s_L) + b) (its coupling without ρ on s_out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ep_lightning.models import EnergyBasedNet, EnergyModel

State = tuple[Tensor, ...]


def _leaves(state: Sequence[Tensor]) -> list[Tensor]:
    return [s.detach().clone().requires_grad_(True) for s in state]


def dphi_ds(model: EnergyModel, x: Tensor, state: Sequence[Tensor]) -> list[Tensor]:
    """∂Φ/∂s for every layer, by autograd of the model's per-sample Φ summed over the batch."""
    leaves = _leaves(state)
    return list(torch.autograd.grad(model.phi(x, tuple(leaves)).sum(), leaves))


def nudge(model: EnergyModel, state: Sequence[Tensor], target: Tensor) -> list[Tensor]:
    """−∂ℓ/∂s for every layer (zero where ℓ does not depend on the layer), by autograd of the model's cost."""
    leaves = _leaves(state)
    grads = torch.autograd.grad(model.cost(tuple(leaves), target).sum(), leaves, allow_unused=True)
    return [torch.zeros_like(s) if g is None else -g for s, g in zip(state, grads)]


def prototypical_step(
    model: EnergyModel,
    x: Tensor,
    state: Sequence[Tensor],
    sigma: Callable[[Tensor], Tensor],
    dt: float = 1.0,
    beta: float = 0.0,
    target: Tensor | None = None,
    nudge_inside: bool = False,
) -> State:
    """s + dt(σ(∂Φ/∂s + [inside] β(−∂ℓ/∂s)) − s) + [outside] dt β(−∂ℓ/∂s), every layer from the old state.
    ``nudge_inside`` for a ce read-out (the nudge enters σ), else the mse output nudge (added outside σ)."""
    drive = dphi_ds(model, x, state)
    pull = nudge(model, state, target) if beta != 0.0 else [torch.zeros_like(s) for s in state]
    new = []
    for s, d, p in zip(state, drive, pull):
        inner = d + beta * p if nudge_inside else d
        step = s + dt * (sigma(inner) - s)
        new.append(step if nudge_inside else step + dt * beta * p)
    return tuple(new)


def energy_gradient(
    model: EnergyBasedNet,
    x: Tensor,
    state: Sequence[Tensor],
    beta: float = 0.0,
    target: Tensor | None = None,
    anchor: Sequence[Tensor] | None = None,
    lam: float = 0.0,
) -> list[Tensor]:
    """∂(E + (λ/2)‖s − s^f‖² + βℓ)/∂s per layer; the output layer's E term follows ``model.output_dynamics``."""
    leaves = _leaves(state)
    total = model.energy(x, tuple(leaves)).sum()
    if beta != 0.0:
        total = total + beta * model.cost(tuple(leaves), target).sum()
    if anchor is not None:
        total = total + 0.5 * lam * sum(((s - a) ** 2).sum() for s, a in zip(leaves, anchor))
    grads = list(torch.autograd.grad(total, leaves))
    if model.output_dynamics == "linear":
        # Output: ∂/∂s_out of ½‖s_out‖² − s_out·(W ρ(s_L) + b) (+ βℓ, + anchor), with s_L held fixed.
        out = leaves[-1]
        below = model.rho(state[-2] if len(state) > 1 else x.flatten(1))
        linear = 0.5 * out.pow(2).sum() - (out * model.synapses[-1](below)).sum()
        if beta != 0.0:
            linear = linear + beta * model.cost(tuple(leaves), target).sum()
        if anchor is not None:
            linear = linear + 0.5 * lam * ((out - anchor[-1]) ** 2).sum()
        grads[-1] = torch.autograd.grad(linear, out)[0]
    return grads


def energy_step(
    model: EnergyBasedNet,
    x: Tensor,
    state: Sequence[Tensor],
    beta: float = 0.0,
    target: Tensor | None = None,
    anchor: Sequence[Tensor] | None = None,
    lam: float = 0.0,
) -> State:
    """clamp(s − ε ∂(E + (λ/2)‖s − s^f‖² + βℓ)/∂s) (clamp to [0, 1] only if ``model.clamp``)."""
    grads = energy_gradient(model, x, state, beta, target, anchor, lam)
    new = tuple(s - model.eps * g for s, g in zip(state, grads))
    return tuple(s.clamp(0.0, 1.0) for s in new) if model.clamp else new
