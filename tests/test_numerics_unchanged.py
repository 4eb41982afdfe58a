"""The fast paths (fused steps, bilinear EP contrast, metrics) leave the numerics unchanged: one real training step
of EquilibriumModule (through a Lightning Trainer) gives the weights of a straightforward implementation written
here with autograd only — states by s ← σ(∂Φ/∂s) (P) or s ← clamp(s − ε ∂E/∂s) (EB), update by autograd of Φ."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ep_lightning.models import EnergyBasedNet, EnergyModel, PrototypicalNet
from ep_lightning.systems import EquilibriumModule


def naive_step(model: EnergyModel, x: torch.Tensor, state: tuple, beta: float, y: torch.Tensor) -> tuple:
    """One transition from autograd of Φ (P: σ(∂Φ/∂s) + β(y − s_out)) or of E (EB: clamp(s − ε∂(E + βℓ)/∂s))."""
    state = tuple(s.detach().requires_grad_() for s in state)
    if isinstance(model, EnergyBasedNet):
        total = (model.energy(x, state) + beta * model.cost(state, y)).sum()
        grads = torch.autograd.grad(total, state)
        return tuple((s - model.eps * g).clamp(0, 1).detach() for s, g in zip(state, grads))
    grads = torch.autograd.grad(model.phi(x, state).sum(), state)
    new = [model.sigma(g) for g in grads]
    new[-1] = new[-1] + beta * (y - state[-1])
    return tuple(s.detach() for s in new)


def naive_ep_weights(model: EnergyModel, x, y, T: int, K: int, beta: float, lrs: list[float]) -> dict:
    state = model.init_state(x)
    for _ in range(T):
        state = naive_step(model, x, state, 0.0, y)
    free = state
    for _ in range(K):
        state = naive_step(model, x, state, beta, y)
    params = list(model.parameters())
    # Δθ = (1/β)(∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)), batch mean; θ ← θ + η Δθ
    delta = torch.autograd.grad((model.phi(x, state) - model.phi(x, free)).mean() / beta, params)
    delta_of = {id(p): d for p, d in zip(params, delta)}
    with torch.no_grad():
        for group, lr in zip(model.parameter_groups(), lrs):
            for p in group:
                p.add_(delta_of[id(p)], alpha=lr)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "model_factory",
    [
        lambda: PrototypicalNet([20, 12, 5]),
        lambda: PrototypicalNet([20, 12, 9, 5], activation="hard_sigmoid"),
        lambda: EnergyBasedNet([20, 12, 5]),
    ],
    ids=["p1h", "p2h_hard", "eb1h"],
)
def test_one_training_step_equals_the_straightforward_implementation(model_factory, tmp_path) -> None:
    torch.manual_seed(3)
    model = model_factory().double()
    reference = copy.deepcopy(model)
    x = torch.rand(8, 20, dtype=torch.float64)
    labels = torch.randint(0, 5, (8,))
    T, K, beta, lrs = 12, 4, 0.3, [0.05, 0.02, 0.01][: len(model.parameter_groups())]
    module = EquilibriumModule(model, algorithm="ep", T=T, K=K, beta=beta, lrs=lrs)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, labels), batch_size=8))
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    expected = naive_ep_weights(reference, x, torch.nn.functional.one_hot(labels, 5).double(), T, K, beta, lrs)
    for name, value in model.state_dict().items():
        # float64, same mathematics in a different order (fused kernels, bilinear contrast): agreement to 1e-12.
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert all((value - initial[name]).abs().max() > 0 for name, value in model.state_dict().items()), "no update"
