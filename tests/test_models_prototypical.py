"""PrototypicalNet of any depth: one step equals σ(autograd ∂Φ/∂s), and the EP surrogate's gradient equals the
hand formula ∂Φ/∂W_n = h_{n+1} h_nᵀ, ∂Φ/∂b_n = h_{n+1} (float64 throughout).

Tolerances: float64 with O(10) terms per entry gives round-off ~1e-15; 1e-12 leaves margin and is still far below any
real error (a missing feedback term or a wrong transpose changes entries by O(0.1)).
"""

from __future__ import annotations

import pytest
import reference
import torch

from ep_lightning.estimators import ep_surrogate
from ep_lightning.models import PrototypicalNet
from ep_lightning.models.activations import get_activation
from ep_lightning.relaxation import relax

TOL = {"rtol": 1e-12, "atol": 1e-12}
DEPTHS = {"1h": [7, 6, 4], "2h": [7, 6, 5, 4], "3h": [7, 6, 5, 5, 4]}


def make(layers: list[int], activation: str = "sigmoid", dt: float = 1.0, seed: int = 0) -> PrototypicalNet:
    torch.manual_seed(seed)
    return PrototypicalNet(layers, activation=activation, dt=dt).double()


def random_state(model: PrototypicalNet, batch: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, n, generator=g, dtype=torch.float64) for n in model.layers[1:])


@pytest.mark.parametrize("depth", list(DEPTHS))
@pytest.mark.parametrize("activation", ["identity", "sigmoid", "hard_sigmoid"])
def test_step_equals_sigma_of_autograd_dphi(depth: str, activation: str) -> None:
    """s_{t+1} = σ(∂Φ/∂s(s_t)) for every layer (middle layers get drive from both neighbours)."""
    model = make(DEPTHS[depth], activation)
    x = torch.rand(3, DEPTHS[depth][0], dtype=torch.float64)
    state = random_state(model, 3)
    sigma, _ = get_activation(activation)
    expected = reference.prototypical_step(model, x, state, sigma)
    with torch.no_grad():
        got = model.step(state, model.drive(x))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("depth", list(DEPTHS))
def test_nudged_step_and_leak(depth: str) -> None:
    """With β and dt: s ← s + dt(σ(∂Φ/∂s) − s), plus dt·β(y − s_out) on the output layer only."""
    beta, dt = 0.3, 0.5
    model = make(DEPTHS[depth], "sigmoid", dt=dt)
    x = torch.rand(3, DEPTHS[depth][0], dtype=torch.float64)
    state = random_state(model, 3)
    target = model.encode_target(torch.tensor([0, 3, 1]), x)
    sigma, _ = get_activation("sigmoid")
    expected = reference.prototypical_step(model, x, state, sigma, dt=dt, beta=beta, target=target)
    # The reference's output nudge is −∂ℓ/∂s_out = y − s_out: check it is the one the test means.
    out = state[-1]
    by_hand = out + dt * (sigma(reference.dphi_ds(model, x, state)[-1]) - out) + dt * beta * (target - out)
    torch.testing.assert_close(expected[-1], by_hand, **TOL)
    with torch.no_grad():
        got = model.step(state, model.drive(x), beta, target)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def hand_dphi_dtheta(model: PrototypicalNet, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Batch-summed ∂Φ/∂W_n = Σ_b h_{n+1} h_nᵀ and ∂Φ/∂b_n = Σ_b h_{n+1}, in ``model.parameters()`` order."""
    below = [x] + list(state[:-1])
    out: list[torch.Tensor] = []
    for h_low, h_high in zip(below, state):
        out += [h_high.T @ h_low, h_high.sum(0)]
    return out


@pytest.mark.parametrize("depth", list(DEPTHS))
def test_hand_formula_matches_autograd_of_phi(depth: str) -> None:
    model = make(DEPTHS[depth])
    x = torch.rand(4, DEPTHS[depth][0], dtype=torch.float64)
    state = random_state(model, 4)
    auto = torch.autograd.grad(model.phi(x, state).sum(), list(model.parameters()))
    for a, h in zip(auto, hand_dphi_dtheta(model, x, state)):
        torch.testing.assert_close(a, h, **TOL)


@pytest.mark.parametrize("depth", list(DEPTHS))
def test_ep_surrogate_gradient_is_the_ep_update(depth: str) -> None:
    """−∇L_EP = Δθ = (1/(βB)) Σ_b (∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)), on relaxed states."""
    beta, batch = 0.5, 4
    model = make(DEPTHS[depth])
    x = torch.rand(batch, DEPTHS[depth][0], dtype=torch.float64)
    target = model.encode_target(torch.tensor([0, 1, 2, 3]), x)
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), 20)
        nudged = relax(model, drive, free, 5, beta, target)
    assert not torch.allclose(free[-1], nudged[-1]), "the nudge must move the output for this test to mean anything"
    model.zero_grad()
    ep_surrogate(model, x, free, nudged, (0.0, beta)).backward()
    pairs = zip(hand_dphi_dtheta(model, x, nudged), hand_dphi_dtheta(model, x, free))
    hand = [(n - f) / (beta * batch) for n, f in pairs]
    for p, delta in zip(model.parameters(), hand):
        torch.testing.assert_close(-p.grad, delta, **TOL)


def test_parameter_groups_follow_layers() -> None:
    model = make(DEPTHS["3h"])
    groups = model.parameter_groups()
    assert len(groups) == 4
    assert [tuple(g[0].shape) for g in groups] == [(6, 7), (5, 6), (5, 5), (4, 5)]
