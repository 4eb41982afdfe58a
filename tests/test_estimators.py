"""The two update rules: BPTT against a naive unrolled computation, EP against BPTT as β → 0."""

from __future__ import annotations

import pytest
import torch

from ep_lightning.estimators import bptt_loss, ep_surrogate
from ep_lightning.models import EnergyBasedNet, PrototypicalNet
from ep_lightning.relaxation import relax
from ep_lightning.systems import EquilibriumModule


def naive_p1h_bptt_grads(model: PrototypicalNet, x: torch.Tensor, y: torch.Tensor, T: int, K: int) -> list[torch.Tensor]:
    """Gradient of ½‖s_0^T − y‖² (batch mean) through the last K steps, the P-1h dynamics written out by hand
    in plain torch with autograd (independent of model.step / relax)."""
    W1, b1 = model.synapses[0].weight, model.synapses[0].bias
    W0, b0 = model.synapses[1].weight, model.synapses[1].bias
    sig = lambda z: torch.sigmoid(4 * (z - 0.5))
    h = torch.zeros(x.shape[0], W1.shape[0], dtype=x.dtype)
    o = torch.zeros(x.shape[0], W0.shape[0], dtype=x.dtype)
    for t in range(T):
        if t == T - K:
            h, o = h.detach(), o.detach()
        with torch.set_grad_enabled(t >= T - K):
            h, o = sig(x @ W1.T + b1 + o @ W0), sig(h @ W0.T + b0)
    loss = 0.5 * ((o - y) ** 2).sum(1).mean()
    return list(torch.autograd.grad(loss, [W1, b1, W0, b0]))


def test_bptt_gradient_matches_naive_unrolled_computation() -> None:
    torch.manual_seed(1)
    model = PrototypicalNet([12, 9, 4]).double()
    x = torch.rand(6, 12, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (6,)), 4).double()
    module = EquilibriumModule(model, algorithm="bptt", T=15, K=6)
    loss, final, _, _ = module.bptt_update(x, y, model.init_state(x))
    torch.testing.assert_close(loss, bptt_loss(model, final, y), rtol=0, atol=0)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = naive_p1h_bptt_grads(model, x, y, T=15, K=6)
    for got, want in zip(grads, expected):
        # Same float64 operations in a different order: agreement to rounding (1e-12 relative).
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _ep_vs_bptt_relative_error(model, x, y, T: int, K: int, beta: float, nudging: str = "one_sided") -> float:
    """‖∇ L_EP − ∇ L_BPTT‖ / ‖∇ L_BPTT‖ over all parameters, for a converged free phase.

    ``nudging='symmetric'`` takes the EP update from ``EquilibriumModule.ep_update`` (free phase, then the ±β phases
    as one doubled batch): (1/2β)(∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^{−β})).
    """
    params = list(model.parameters())
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), T)
        nudged = relax(model, drive, free, K, beta, y)
    if nudging == "symmetric":
        module = EquilibriumModule(model, T=T, K=K, beta=beta, nudging="symmetric")
        ep = torch.autograd.grad(module.ep_update(x, y, model.init_state(x))[0], params)
    else:
        ep = torch.autograd.grad(ep_surrogate(model, x, free, nudged, (0.0, beta)), params)
    # BPTT from the converged state: K steps with graph (T − K already converged, so starting at s* is equivalent).
    final = relax(model, model.drive(x), free, K)
    bptt = torch.autograd.grad(bptt_loss(model, final, y), params)
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(ep, bptt)))
    norm = torch.sqrt(sum((b**2).sum() for b in bptt))
    return float(diff / norm)


@pytest.mark.parametrize(
    "model_factory",
    [
        # P nets with σ ≠ identity do not derive exactly from Φ: EP → BPTT only approximately (GDU, "approximately
        # otherwise"); the error still falls with β until that approximation floor. tanh + small weights converge.
        lambda: PrototypicalNet([10, 16, 5], activation="tanh"),
        # EB nets derive exactly from Φ_ε = ½‖s‖² − εE: error falls linearly in β down to float64 precision.
        lambda: EnergyBasedNet([10, 16, 5], activation="tanh", eps=0.2, clamp=False),
    ],
    ids=["prototypical_tanh", "energy_tanh"],
)
def test_ep_update_approaches_bptt_gradient_as_beta_shrinks(model_factory) -> None:
    torch.manual_seed(2)
    model = model_factory().double()
    with torch.no_grad():  # small weights: a contraction, so the free phase converges to float64 precision
        for p in model.parameters():
            p.mul_(0.5)
    x = torch.rand(4, 10, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (4,)), 5).double()
    T, K = 400, 400  # K large: EP's update is the full-K BPTT gradient through a converged trajectory
    if isinstance(model, EnergyBasedNet):
        errors = [_ep_vs_bptt_relative_error(model, x, y, T, K, beta) for beta in (1e-2, 1e-3, 1e-4)]
        # Exact setting: the bias is first order in β, so 10× smaller β → ≈10× smaller error (allow 6×–14×),
        # down to 1e-3 well above float64 rounding (~1e-12 here).
        assert 6 < errors[0] / errors[1] < 14 and 6 < errors[1] / errors[2] < 14, errors
        assert errors[2] < 1e-3, errors
    else:
        errors = [_ep_vs_bptt_relative_error(model, x, y, T, K, beta) for beta in (1e-1, 1e-2)]
        # Approximate setting: the O(β) part shrinks ~10× (measured 0.096 → 0.012) until the floor set by
        # σ' ≠ 1 (≈1 % here); assert a clear fall and a small final error.
        assert errors[1] < errors[0] / 4, errors
        assert errors[1] < 0.05, errors
