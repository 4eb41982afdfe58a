"""EnergyBasedNet: the closed-form step (both output dynamics) against the autograd reference (tests/reference.py),
the EP surrogate against the hand formula, and states confined to [0, 1]."""

from __future__ import annotations

from typing import Any

import pytest
import reference
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


@pytest.mark.parametrize("output_dynamics", ["energy_gradient", "linear"])
@pytest.mark.parametrize("layers", [[7, 3], [7, 5, 3], [7, 6, 5, 3]], ids=["0h", "1h", "2h"])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_step_equals_autograd_reference(output_dynamics: str, layers: list[int], activation: str, beta: float) -> None:
    """``energy_gradient``: s ← clamp(s − ε ∂(E + βℓ)/∂s); ``linear``: the same for the layers below the output, and
    s_out ← s_out − ε ∂/∂s_out[½‖s_out‖² − s_out·(W ρ(s_L) + b) + βℓ] (tests/reference.py)."""
    dynamics: Any = output_dynamics
    model = EnergyBasedNet(layers, activation=activation, eps=0.3, cost_scale=0.5, output_dynamics=dynamics).double()
    x = torch.rand(4, 7, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (4,)), 3).double()
    state = _random_state(model, 4)
    expected = reference.energy_step(model, x, state, beta, y)
    got = model.step(state, model.drive(x), beta, y)
    for a, b in zip(got, expected):
        # Same float64 computation up to operation order: 1e-12.
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_output_drops_only_the_output_derivative() -> None:
    """The two output dynamics differ on the output layer only, by the factor ρ'(s_out) on its drive W ρ(s_L) + b:
    (new_out − (1 − ε)s_out) = ε·pre (linear) and ε·ρ'(s_out)·pre (energy_gradient), from the same state."""
    torch.manual_seed(3)
    gradient = EnergyBasedNet([6, 5, 4], eps=0.2, clamp=False).double()
    linear = EnergyBasedNet([6, 5, 4], eps=0.2, clamp=False, output_dynamics="linear").double()
    linear.load_state_dict(gradient.state_dict())
    x = torch.rand(3, 6, dtype=torch.float64)
    state = _random_state(gradient, 3)
    a, b = gradient.step(state, gradient.drive(x)), linear.step(state, linear.drive(x))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    pre = gradient.synapses[-1](gradient.rho(state[0]))
    out = state[-1]
    slope = 4 * gradient.rho(out) * (1 - gradient.rho(out))
    torch.testing.assert_close(b[-1] - 0.8 * out, 0.2 * pre, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a[-1] - 0.8 * out, 0.2 * slope * pre, rtol=1e-12, atol=1e-14)


def test_unknown_output_dynamics_is_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="output_dynamics='exact'.*'energy_gradient'.*'linear'"):
        EnergyBasedNet([4, 3], output_dynamics="exact")  # type: ignore[arg-type]


@pytest.mark.parametrize("output_dynamics", ["energy_gradient", "linear"])
def test_anchor_adds_lambda_times_distance_to_the_gradient(output_dynamics: str) -> None:
    dynamics: Any = output_dynamics
    model = EnergyBasedNet([6, 5, 3], "hard_sigmoid", eps=0.5, cost_scale=1.0, output_dynamics=dynamics).double()
    x = torch.rand(3, 6, dtype=torch.float64)
    state = _random_state(model, 3)
    anchor = _random_state(model, 3)
    lam = 0.4
    expected = reference.energy_step(model, x, state, anchor=anchor, lam=lam)
    got = model.step(state, model.drive(x, anchor=anchor, anchor_strength=lam))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ep_surrogate_gradient_equals_hand_formula() -> None:
    """∇_W L_EP = −(1/β)(ρ(s^β_{n+1})ρ(s^β_n)ᵀ − ρ(s*_{n+1})ρ(s*_n)ᵀ) (batch mean), since
    ∂(−E)/∂W_n = ρ(h_{n+1})ρ(h_n)ᵀ."""
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
def test_clamped_states_stay_in_unit_interval(
    seed: int, activation: str, beta: float, eps: float, weight_scale: float
) -> None:
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
    with pytest.raises(ValueError, match="eps=0"):
        EnergyBasedNet([4, 3], eps=0.0)
    with pytest.raises(ValueError, match="activation='relu'"):
        EnergyBasedNet([4, 3], activation="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers="):
        EnergyBasedNet([4])
