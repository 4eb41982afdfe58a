"""ConvPrototypicalNet (P-conv): geometry validation, step = σ(autograd ∂Φ/∂s) through max-pool indices and the
transposed convolution, the EP surrogate's gradient = the hand formula, drive computed once, BPTT-ready graph.

Tolerances: float64; each entry sums at most a few thousand products of O(1) terms, so round-off is ~1e-13;
1e-10 leaves margin and is far below any real error (stale pool indices or a flipped kernel change entries by O(0.1)).
"""

from __future__ import annotations

import re

import pytest
import reference
import torch
import torch.nn.functional as F

from ep_lightning.estimators import ep_surrogate
from ep_lightning.models import ConvPrototypicalNet
from ep_lightning.models.activations import get_activation
from ep_lightning.relaxation import relax

TOL = {"rtol": 1e-10, "atol": 1e-10}
#: The paper's P-conv (28 → 24 → 12 → 8 → 4), and a small 3-conv-layer net with padding (16 → 8 → 4 → 2), which
#: has a middle conv layer receiving input from below and unpooled feedback from above.
GEOMETRIES = {
    "paper": {},
    "three_conv_padded": {
        "input_size": 16,
        "input_channels": 2,
        "channels": [3, 4, 5],
        "kernel_size": 3,
        "padding": 1,
        "num_classes": 6,
    },
}


def make(geometry: str, activation: str = "hard_sigmoid", seed: int = 0) -> ConvPrototypicalNet:
    torch.manual_seed(seed)
    return ConvPrototypicalNet(**GEOMETRIES[geometry], activation=activation).double()


def random_input(model: ConvPrototypicalNet, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, model.input_channels, model.input_size, model.input_size, generator=g, dtype=torch.float64)


def random_state(model: ConvPrototypicalNet, batch: int, seed: int = 2) -> tuple[torch.Tensor, ...]:
    """Uniform (0, 1) states: no ties inside pooling windows (almost surely), unlike the all-zero initial state."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, *shape, generator=g, dtype=torch.float64) for shape in model.init_state_shapes())


# --- geometry ------------------------------------------------------------------------------------------------
def test_paper_geometry() -> None:
    model = ConvPrototypicalNet()
    assert model.conv_sizes == [24, 8]
    assert model.init_state_shapes() == [(32, 12, 12), (64, 4, 4), (10,)]
    assert model.fc.in_features == 64 * 4 * 4
    assert [tuple(g[0].shape) for g in model.parameter_groups()] == [(32, 1, 5, 5), (64, 32, 5, 5), (10, 1024)]
    assert model.state_names() == ["conv1", "conv2", "output"]
    state = model.init_state(torch.zeros(3, 1, 28, 28))
    assert [tuple(s.shape) for s in state] == [(3, 32, 12, 12), (3, 64, 4, 4), (3, 10)]


def test_other_geometries_that_fit() -> None:
    assert ConvPrototypicalNet(padding=2).init_state_shapes() == [(32, 14, 14), (64, 7, 7), (10,)]  # 28→28→14→14→7
    assert ConvPrototypicalNet(input_size=20).init_state_shapes() == [(32, 8, 8), (64, 2, 2), (10,)]  # 20→16→8→4→2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"channels": [32, 64, 128]}, "channels=[32, 64, 128]"),  # third conv gets 4×4 < 5×5 kernel
        ({"kernel_size": 6}, "kernel_size=6"),  # 28 − 6 + 1 = 23 is odd: not a multiple of pool_size 2
        ({"pool_size": 3}, "pool_size=3"),  # 24 / 3 = 8, 8 − 4 = 4 is not a multiple of 3
        ({"input_size": 10}, "input_size=10"),  # 10 → 6 → 3 → conv gives −1
        ({"pool_size": 0}, "pool_size=0"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"channels": []}, "channels=[]"),
        ({"channels": [32, 0]}, "channels=[32, 0]"),
        ({"padding": 5}, "padding=5"),
        ({"padding": -1}, "padding=-1"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"input_channels": 0}, "input_channels=0"),
        ({"activation": "relu"}, "activation='relu'"),
    ],
)
def test_invalid_geometry_raises_naming_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        ConvPrototypicalNet(**kwargs)


def test_input_of_wrong_size_is_rejected_and_flat_input_accepted() -> None:
    model = make("paper")
    x = random_input(model, 2)
    torch.testing.assert_close(model.drive(x.flatten(1)), model.drive(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="input_size=28"):
        model.drive(torch.zeros(2, 1, 32, 32, dtype=torch.float64))


# --- dynamics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("activation", ["identity", "hard_sigmoid", "sigmoid"])
def test_step_equals_sigma_of_autograd_dphi(geometry: str, activation: str) -> None:
    """s_{t+1} = σ(∂Φ/∂s(s_t)) for every layer, conv layers included (identity σ checks ∂Φ/∂s itself)."""
    model = make(geometry, activation)
    x, state = random_input(model, 3), random_state(model, 3)
    sigma, _ = get_activation(activation)
    # autograd routes s_{i+1}'s gradient through the argmax of the pooling at the *current* s_i, which is what the
    # closed-form feedback convᵀ(unpool(s_{i+1}, indices)) must reproduce.
    expected = reference.prototypical_step(model, x, state, sigma)
    with torch.no_grad():
        got = model.step(state, model.drive(x))
    assert [tuple(g.shape) for g in got] == [tuple(s.shape) for s in state]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_feedback_uses_pool_indices_of_current_state() -> None:
    """The feedback into s_1 routes through the argmax at the current s_1: two states whose pooled conv_2 outputs
    pick different positions give different feedback, each equal to its own autograd ∂Φ/∂s_1."""
    model = make("paper", "identity")
    x = random_input(model, 2)
    a, b = random_state(model, 2, seed=3), random_state(model, 2, seed=4)
    b = (b[0], a[1], a[2])  # same s_2 and output: only the indices (set by s_1) differ
    ind_a = F.max_pool2d(model.convs[1](a[0]), 2, return_indices=True)[1]
    ind_b = F.max_pool2d(model.convs[1](b[0]), 2, return_indices=True)[1]
    assert not torch.equal(ind_a, ind_b)
    with torch.no_grad():
        drive = model.drive(x)
        fb_a = model.step(a, drive)[0] - drive
        fb_b = model.step(b, drive)[0] - drive
    torch.testing.assert_close(fb_a, reference.dphi_ds(model, x, a)[0] - drive, **TOL)
    torch.testing.assert_close(fb_b, reference.dphi_ds(model, x, b)[0] - drive, **TOL)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_nudged_step(geometry: str) -> None:
    """With β: o ← σ(∂Φ/∂o) + β(y − o); conv layers are not nudged."""
    beta = 0.4
    model = make(geometry, "hard_sigmoid")
    x, state = random_input(model, 3), random_state(model, 3)
    target = model.encode_target(torch.tensor([0, 2, 5]), x)
    sigma, _ = get_activation("hard_sigmoid")
    expected = reference.prototypical_step(model, x, state, sigma, beta=beta, target=target)
    with torch.no_grad():
        got = model.step(state, model.drive(x), beta, target)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_drive_is_computed_once_per_batch() -> None:
    """The input term P(conv_1(x)) comes from ``drive``: relaxing never calls the first convolution again."""
    model = make("paper")
    x = random_input(model, 2)
    calls = []
    model.convs[0].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        drive = model.drive(x)
        torch.testing.assert_close(drive, F.max_pool2d(model.convs[0](x), 2), rtol=0, atol=0)
        calls.clear()
        relax(model, drive, model.init_state(x), 5)
    assert calls == []


def _steps(model: ConvPrototypicalNet, params: dict, state: tuple, drive: torch.Tensor, k: int) -> tuple:
    """k steps of ``model.step`` with the parameters in ``params`` substituted (torch.func.functional_call)."""

    class Stepper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, s: tuple, d: torch.Tensor) -> tuple:
            for _ in range(k):
                s = self.net.step(s, d)
            return s

    stepper = Stepper()
    return torch.func.functional_call(stepper, {f"net.{n}": p for n, p in params.items()}, (state, drive), strict=False)


def test_steps_gradcheck_through_pooling() -> None:
    """gradcheck (finite differences vs autograd) of 2 steps w.r.t. conv_2, conv_3 and fc weights: the graph that
    BPTT back-propagates through (max-pool, max-unpool, conv_transpose) is correct. Uniform random states keep
    pooling windows tie-free, so the function is smooth at the check point."""
    model = make("three_conv_padded", "sigmoid")
    x, state = random_input(model, 2), random_state(model, 2)
    drive = model.drive(x).detach()
    names = ["convs.1.weight", "convs.2.weight", "fc.weight"]
    base = {n: p.detach() for n, p in model.named_parameters()}

    def f(*ws: torch.Tensor) -> torch.Tensor:
        params = dict(base, **dict(zip(names, ws)))
        return torch.cat([t.flatten() for t in _steps(model, params, state, drive, 2)])

    inputs = tuple(base[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# --- learning rule -------------------------------------------------------------------------------------------
def hand_dphi_dtheta(
    model: ConvPrototypicalNet, x: torch.Tensor, state: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    """Batch-summed ∂Φ/∂θ in ``model.parameters()`` order, by the formulas of Ernoult et al. (appendix E):

    ∂Φ/∂W_i[o, c, a, b] = Σ_{batch, y, z} unpool(s_i)[o, y, z] · pad(s_{i−1})[c, y + a, z + b]   (a correlation),
    ∂Φ/∂b_i = Σ s_i,   ∂Φ/∂W_fc = oᵀ s_L,   ∂Φ/∂b_fc = Σ_batch o,

    where unpool puts s_i at the argmax positions of the pooling of conv_i(s_{i−1}) at this state.
    """
    below = [x] + list(state[:-2])
    grads: list[torch.Tensor] = []
    for i, (s_low, s_high) in enumerate(zip(below, state[:-1])):
        conv = model.convs[i](s_low)
        _, ind = F.max_pool2d(conv, model.pool_size, return_indices=True)
        unpooled = F.max_unpool2d(s_high, ind, model.pool_size, output_size=conv.shape[-2:])
        weight = F.conv2d(s_low.transpose(0, 1), unpooled.transpose(0, 1), padding=model.padding).transpose(0, 1)
        grads += [weight, s_high.sum(dim=(0, 2, 3))]
    out, top = state[-1], state[-2].flatten(1)
    return grads + [out.T @ top, out.sum(0)]


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_hand_formula_matches_autograd_of_phi(geometry: str) -> None:
    model = make(geometry)
    x, state = random_input(model, 3), random_state(model, 3)
    auto = torch.autograd.grad(model.phi(x, state).sum(), list(model.parameters()))
    hand = hand_dphi_dtheta(model, x, state)
    assert len(auto) == len(hand)
    for a, h in zip(auto, hand):
        torch.testing.assert_close(a, h, **TOL)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_ep_surrogate_gradient_is_the_ep_update(geometry: str) -> None:
    """−∇L_EP = Δθ = (1/(βB)) Σ_b (∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)), each term with its own state's pool indices."""
    beta, batch = 0.4, 3
    model = make(geometry)
    x = random_input(model, batch)
    target = model.encode_target(torch.tensor([0, 1, 2]), x)
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), 15)
        nudged = relax(model, drive, free, 5, beta, target)
    assert not torch.allclose(free[-1], nudged[-1]), "the nudge must move the output for this test to mean anything"
    model.zero_grad()
    ep_surrogate(model, x, free, nudged, (0.0, beta)).backward()
    hand_n, hand_f = hand_dphi_dtheta(model, x, nudged), hand_dphi_dtheta(model, x, free)
    for p, n, f in zip(model.parameters(), hand_n, hand_f):
        torch.testing.assert_close(-p.grad, (n - f) / (beta * batch), **TOL)


# --- relaxation_conv_dtype: bfloat16 convolutions inside the steps only ------------------------------------------
def test_bfloat16_relaxation_convolutions_approximate_the_float32_step_and_leave_phi_exact() -> None:
    """With ``relaxation_conv_dtype='bfloat16'`` a step equals the float32 step up to bfloat16 rounding, the state
    stays float32, and Φ (hence the EP update) is the float32 Φ exactly.

    Tolerance: bfloat16 keeps 8 significand bits (relative rounding 2^-9 ≈ 2e-3 per input and kernel entry); a
    pre-activation sums ~800 such products of O(0.1) terms with float32 accumulation, so its error is ~1e-2 at most.
    Where two entries of a pooling window are within that error, the argmax can flip and the unpooled feedback moves
    to the neighbouring position (an O(0.1) change): measured on 1.2 % of the entries here, mean error 5.2e-3. Hence:
    97 % of the entries within 5e-2 and a mean error under 1e-2, both far from a wrong kernel, index or missing
    feedback (O(0.1) everywhere)."""
    torch.manual_seed(0)
    exact = ConvPrototypicalNet(**GEOMETRIES["paper"])
    fast = ConvPrototypicalNet(**GEOMETRIES["paper"], relaxation_conv_dtype="bfloat16")
    fast.load_state_dict(exact.state_dict())
    x = random_input(exact, 4).float()
    state = tuple(s.float() for s in random_state(exact, 4))
    with torch.no_grad():
        want = exact.step(state, exact.drive(x))
        got = fast.step(state, fast.drive(x))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        error = (g - w).abs()
        assert float((error <= 5e-2).float().mean()) >= 0.97 and float(error.mean()) < 1e-2
    assert any(not torch.equal(g, w) for g, w in zip(got, want)), "bfloat16 convolutions were not used"
    torch.testing.assert_close(fast.phi(x, state), exact.phi(x, state), rtol=0, atol=0)


def test_unknown_relaxation_conv_dtype_is_rejected_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="relaxation_conv_dtype='float16'.*'float32', 'bfloat16'"):
        ConvPrototypicalNet(relaxation_conv_dtype="float16")
