"""EnergyBasedNet: the closed-form step against autograd of E, the EP surrogate against the hand formula,
and states confined to [0, 1]."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ep_lightning.estimators import ep_surrogate
from ep_lightning.models import EnergyBasedNet
from ep_lightning.models.activations import ACTIVATIONS
from ep_lightning.relaxation import relax


def _random_state(model: EnergyBasedNet, batch: int) -> tuple[torch.Tensor, ...]:
    # Interior points of (0, 1): away from hard-sigmoid kinks, where ρ' is not differentiable.
    return tuple(0.05 + 0.9 * torch.rand(batch, n, dtype=torch.float64) for n in model.layers[1:])


def test_step_equals_euler_step_on_autograd_energy_gradient() -> None:
    for activation in ("sigmoid", "hard_sigmoid", "tanh"):
        for layers in ([7, 5, 3], [7, 6, 5, 3]):
            model = EnergyBasedNet(layers, activation=activation, eps=0.3, cost_scale=0.5).double()
            x = torch.rand(4, 7, dtype=torch.float64)
            y = torch.nn.functional.one_hot(torch.randint(0, 3, (4,)), 3).double()
            state = tuple(s.requires_grad_() for s in _random_state(model, 4))
            beta = 0.7
            total = (model.energy(x, state) + beta * model.cost(state, y)).sum()
            grads = torch.autograd.grad(total, state)
            expected = tuple((s - 0.3 * g).clamp(0, 1) for s, g in zip(state, grads))
            got = model.step(tuple(s.detach() for s in state), model.drive(x), beta, y)
            for a, b in zip(got, expected):
                # Same float64 computation up to operation order: 1e-12.
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_anchor_adds_lambda_times_distance_to_the_gradient() -> None:
    model = EnergyBasedNet([6, 5, 3], activation="hard_sigmoid", eps=0.5, cost_scale=1.0).double()
    x = torch.rand(3, 6, dtype=torch.float64)
    state = tuple(s.requires_grad_() for s in _random_state(model, 3))
    anchor = _random_state(model, 3)
    lam = 0.4
    e_lambda = model.energy(x, state).sum() + 0.5 * lam * sum(((s - a) ** 2).sum() for s, a in zip(state, anchor))
    grads = torch.autograd.grad(e_lambda, state)
    expected = tuple((s - 0.5 * g).clamp(0, 1) for s, g in zip(state, grads))
    got = model.step(tuple(s.detach() for s in state), model.drive(x, anchor=anchor, anchor_strength=lam))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ep_surrogate_gradient_equals_hand_formula() -> None:
    """∇_W L_EP = −(1/β)(ρ(s^β_{n+1})ρ(s^β_n)ᵀ − ρ(s*_{n+1})ρ(s*_n)ᵀ) (batch mean), since ∂(−E)/∂W_n = ρ(h_{n+1})ρ(h_n)ᵀ."""
    model = EnergyBasedNet([8, 6, 4], activation="sigmoid").double()
    x = torch.rand(5, 8, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (5,)), 4).double()
    beta = 0.5
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), 20)
        nudged = relax(model, drive, free, 5, beta, y)
    grads = torch.autograd.grad(ep_surrogate(model, x, free, nudged, (0.0, beta)), list(model.parameters()))
    rho = model.rho
    layers_free = (x,) + free
    layers_nudged = (x,) + nudged
    for n in range(2):
        a_free, b_free = rho(layers_free[n]), rho(layers_free[n + 1])
        a_nud, b_nud = rho(layers_nudged[n]), rho(layers_nudged[n + 1])
        dW = -(b_nud.T @ a_nud - b_free.T @ a_free) / (beta * x.shape[0])
        db = -(b_nud - b_free).sum(0) / (beta * x.shape[0])
        torch.testing.assert_close(grads[2 * n], dW, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads[2 * n + 1], db, rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    beta=st.floats(-5.0, 5.0, allow_nan=False),
    eps=st.floats(0.01, 1.0),
    weight_scale=st.floats(0.1, 20.0),
)
def test_clamped_states_stay_in_unit_interval(seed: int, activation: str, beta: float, eps: float, weight_scale: float) -> None:
    """Whatever the weights, input, β and ε, clamped EB states never leave [0, 1] (free and nudged phases)."""
    torch.manual_seed(seed)
    model = EnergyBasedNet([9, 7, 5, 3], activation=activation, eps=eps, clamp=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    x = torch.randn(4, 9) * 3
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (4,)), 3).float()
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), 10)
        nudged = relax(model, drive, free, 5, beta, y)
    for s in free + nudged:
        assert torch.all((s >= 0) & (s <= 1))


def test_invalid_arguments_name_the_field() -> None:
    import pytest

    with pytest.raises(ValueError, match="eps=0"):
        EnergyBasedNet([4, 3], eps=0.0)
    with pytest.raises(ValueError, match="activation='relu'"):
        EnergyBasedNet([4, 3], activation="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers="):
        EnergyBasedNet([4])
