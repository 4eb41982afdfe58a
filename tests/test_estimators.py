"""The two update rules: BPTT against a naive unrolled computation, EP against BPTT as β → 0, the nudging pairs."""

from __future__ import annotations

import pytest
import torch

from ep_lightning.estimators import bptt_loss, ep_surrogate
from ep_lightning.models import EnergyBasedNet, PrototypicalNet
from ep_lightning.relaxation import relax
from ep_lightning.systems import EquilibriumModule
from ep_lightning.systems.estimator import EstimatorSystem


def naive_p1h_bptt_grads(
    model: PrototypicalNet, x: torch.Tensor, y: torch.Tensor, T: int, K: int
) -> list[torch.Tensor]:
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


@pytest.mark.parametrize("bptt_steps", [2, 7, 15])
def test_bptt_steps_truncates_the_backward_to_the_last_steps(bptt_steps: int) -> None:
    """``bptt_steps`` (the authors' FC baselines: K + 1) sets the truncation, independently of K."""
    torch.manual_seed(1)
    model = PrototypicalNet([12, 9, 4]).double()
    x = torch.rand(6, 12, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (6,)), 4).double()
    module = EquilibriumModule(model, algorithm="bptt", T=15, K=6, bptt_steps=bptt_steps)
    grads = torch.autograd.grad(module.bptt_update(x, y, model.init_state(x))[0], list(model.parameters()))
    expected = naive_p1h_bptt_grads(model, x, y, T=15, K=bptt_steps)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # float64, same maths, other op order
    if bptt_steps != 6:  # control: the default truncation (K = 6) gives another gradient
        default = EquilibriumModule(model, algorithm="bptt", T=15, K=6)
        other = torch.autograd.grad(default.bptt_update(x, y, model.init_state(x))[0], list(model.parameters()))
        assert any((a - b).abs().max() > 1e-8 for a, b in zip(other, grads))


@pytest.mark.parametrize("bptt_steps", [0, 16])
def test_bptt_steps_outside_one_to_T_is_rejected(bptt_steps: int) -> None:
    with pytest.raises(
        ValueError, match=rf"model.bptt_steps={bptt_steps} is invalid with model.T=15.*1 ≤ bptt_steps ≤ T"
    ):
        EquilibriumModule(PrototypicalNet([12, 9, 4]), algorithm="bptt", T=15, K=6, bptt_steps=bptt_steps)


def test_nudging_pairs_give_the_ep_update_of_their_formula() -> None:
    """mean[Φ(s_a) − Φ(s_b)]/(β_b − β_a): one-sided (0, β) → (1/β)(∂Φ(s^β) − ∂Φ(s*)), symmetric (−β, β) →
    (1/2β)(∂Φ(s^{+β}) − ∂Φ(s^{−β})), against ∂Φ/∂θ by autograd of ``phi`` (float64: rounding only)."""
    torch.manual_seed(0)
    model = PrototypicalNet([10, 8, 5], activation="tanh").double()
    x = torch.rand(4, 10, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (4,)), 5).double()
    params = list(model.parameters())
    dphi = lambda s: torch.autograd.grad(model.phi(x, s).mean(), params)
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), 30)
        plus, minus = relax(model, drive, free, 8, 0.2, y), relax(model, drive, free, 8, -0.2, y)
    for s_a, s_b, betas in ((free, plus, (0.0, 0.2)), (free, minus, (0.0, -0.2)), (minus, plus, (-0.2, 0.2))):
        got = torch.autograd.grad(ep_surrogate(model, x, s_a, s_b, betas), params)
        want = [(gb - ga) / (betas[1] - betas[0]) for ga, gb in zip(dphi(s_a), dphi(s_b))]
        for g, w in zip(got, want):
            torch.testing.assert_close(-g, w, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="must differ"):
        ep_surrogate(model, x, free, plus, (0.2, 0.2))


@pytest.mark.parametrize("nudging, pair", [("one_sided", (0.0, 0.3)), ("symmetric", (-0.3, 0.3))])
def test_phases_run_every_nudging_through_one_runner(nudging: str, pair: tuple[float, float]) -> None:
    """``EnergySystem.phases``: a β of 0 returns s* itself, two non-zero βs equal two separate nudged relaxations."""
    torch.manual_seed(0)
    model = PrototypicalNet([10, 8, 5]).double()
    module = EquilibriumModule(model, T=12, K=5, beta=0.3, nudging=nudging)
    assert module.nudging_pair() == pair
    x = torch.rand(3, 10, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (3,)), 5).double()
    free, s_a, s_b = module.phases(x, y, model.init_state(x), pair)
    with torch.no_grad():
        want_free = relax(model, model.drive(x), model.init_state(x), 12)
        want_a = want_free if pair[0] == 0 else relax(model, model.drive(x), want_free, 5, pair[0], y)
        want_b = relax(model, model.drive(x), want_free, 5, pair[1], y)
    for got, want in ((free, want_free), (s_a, want_a), (s_b, want_b)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)  # batched vs separate: rounding only
    if pair[0] == 0:
        assert s_a is free


def test_default_optimizer_without_lrs_is_an_error_when_training_starts() -> None:
    """Plain SGD has lr 0: ``lrs: null`` would train nothing, so it is refused; an optimizer with its own lr is fine."""
    model = PrototypicalNet([12, 9, 4])
    with pytest.raises(ValueError, match=r"model.lrs=None is invalid with the default optimizer.*2 groups"):
        EquilibriumModule(model).configure_optimizers()
    adam = EquilibriumModule(model, optimizer=lambda groups: torch.optim.Adam(groups, lr=1e-3)).configure_optimizers()
    assert [g["lr"] for g in adam.param_groups] == [1e-3, 1e-3]
    assert issubclass(EquilibriumModule, EstimatorSystem)


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
