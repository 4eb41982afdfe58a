"""ConvPrototypicalNet: geometry validation, step = σ(autograd ∂Φ/∂s) through every pooling kind (max-pool indices,
average pool's adjoint, none), strided and padded transposed convolutions and the fc tail; the nudge (mse outside or
inside σ, ce read-out); the EP surrogate's gradient = a hand formula for ∂Φ/∂θ; drive computed once; BPTT-ready graph.

Tolerances: float64; each entry sums at most a few thousand products of O(1) terms, so round-off is ~1e-13;
1e-10 leaves margin and is far below any real error (stale pool indices, a flipped kernel, a missing output_padding
row or a wrong average-pool scale change entries by O(0.1)).
"""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
import reference
import torch
import torch.nn.functional as F

from ep_lightning.estimators import ep_surrogate
from ep_lightning.models import ConvPrototypicalNet
from ep_lightning.models.activations import get_activation
from ep_lightning.relaxation import relax

TOL = {"rtol": 1e-10, "atol": 1e-10}
#: The paper's P-conv (28 → 24 → 12 → 8 → 4); a small 3-conv-layer net with padding (16 → 8 → 4 → 2), which has a
#: middle conv layer receiving input from below and unpooled feedback from above; a reduced-width copy of Laborieux
#: et al.'s CIFAR VGG (32 → 16 → 8 → 4 → 2 → 1, paddings 1 1 1 0); and a net with every pooling kind (16 → 16 → max
#: 8 → stride-2 conv 4 → average 2 → 2×2 conv 1 → none 1) whose average-pooled second layer is strided and drops a
#: row (its transpose, the feedback into s_1, needs output_padding 1), per-layer kernels and a hidden fc layer.
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
    "vgg": {
        "input_size": 32,
        "input_channels": 3,
        "channels": [4, 6, 6, 5],
        "kernel_size": 3,
        "padding": [1, 1, 1, 0],
        "pools": "mmmm",
    },
    "pools_strides_fc": {
        "input_size": 16,
        "input_channels": 3,
        "channels": [4, 5, 6],
        "kernel_size": [3, 3, 2],
        "stride": [1, 2, 1],
        "padding": [1, 1, 0],
        "pools": "mai",
        "fc_hidden": [7],
        "num_classes": 5,
    },
}
READOUTS = {"mse": {}, "mse_inside": {"nudge_inside": True}, "ce": {"readout": "ce"}}


def make(geometry: str, activation: str = "hard_sigmoid", seed: int = 0, readout: str = "mse") -> ConvPrototypicalNet:
    torch.manual_seed(seed)
    return ConvPrototypicalNet(**GEOMETRIES[geometry], **READOUTS[readout], activation=activation).double()


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


def test_laborieux_cifar_vgg_geometry() -> None:
    """Their README's CIFAR-10 net: 3×32×32 → 128×16×16 → 256×8×8 → 512×4×4 → 512×1×1 (padding 0 then max-pool) →
    softmax read-out of 512 features; one learning rate per synapse (5)."""
    model = ConvPrototypicalNet(
        input_size=32,
        input_channels=3,
        channels=[128, 256, 512, 512],
        kernel_size=3,
        padding=[1, 1, 1, 0],
        pools="mmmm",
        readout="ce",
        activation="half_slope_hard_sigmoid",
    )
    assert model.conv_sizes == [32, 16, 8, 2]
    assert model.init_state_shapes() == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 1, 1)]
    assert [tuple(g[0].shape) for g in model.parameter_groups()] == [
        (128, 3, 3, 3),
        (256, 128, 3, 3),
        (512, 256, 3, 3),
        (512, 512, 3, 3),
        (10, 512),
    ]
    assert model.state_names() == ["conv1", "conv2", "conv3", "conv4"]


def test_fc_tail_strides_and_pool_kinds_set_the_shapes() -> None:
    model = make("pools_strides_fc")
    assert model.conv_sizes == [16, 4, 1]  # 16; (8 + 2 − 3) // 2 + 1 = 4; 2 − 2 + 1 = 1
    assert model.init_state_shapes() == [(4, 8, 8), (5, 2, 2), (6, 1, 1), (7,), (5,)]
    assert model.state_names() == ["conv1", "conv2", "conv3", "fc1", "output"]
    assert [tuple(g[0].shape) for g in model.parameter_groups()][-2:] == [(7, 6), (5, 7)]
    assert [g.output_padding for g in model.geometry] == [0, 1, 0]  # 8 + 2 − 3 = 7 = 3 · 2 + 1: one row dropped
    ce = ConvPrototypicalNet(**GEOMETRIES["pools_strides_fc"], readout="ce")
    assert ce.init_state_shapes() == [(4, 8, 8), (5, 2, 2), (6, 1, 1), (7,)]
    assert ce.fc.in_features == 7


def test_other_geometries_that_fit() -> None:
    assert ConvPrototypicalNet(padding=2).init_state_shapes() == [(32, 14, 14), (64, 7, 7), (10,)]  # 28→28→14→14→7
    assert ConvPrototypicalNet(input_size=20).init_state_shapes() == [(32, 8, 8), (64, 2, 2), (10,)]  # 20→16→8→4→2
    # per-layer lists and a single value give the same net
    a = ConvPrototypicalNet(kernel_size=[5, 5], padding=[0, 0], stride=[1, 1], pools="mm")
    assert a.init_state_shapes() == ConvPrototypicalNet().init_state_shapes()
    assert ConvPrototypicalNet(pools="i", channels=[4], input_size=8).init_state_shapes() == [(4, 4, 4), (10,)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"channels": [32, 64, 128]}, "channels=[32, 64, 128]"),  # third conv gets 4×4 < 5×5 kernel
        ({"kernel_size": 6}, "kernel_size=6"),  # 28 − 6 + 1 = 23 is odd: not a multiple of pool_size 2
        ({"pool_size": 3}, "pool_size=3"),  # 24 / 3 = 8, 8 − 4 = 4 is not a multiple of 3
        ({"input_size": 10}, "input_size=10"),  # 10 → 6 → 3 → conv gives −1
        ({"stride": 2}, "stride=2"),  # 28 → 12 → pool 6 → 1: not a multiple of 2
        ({"pool_size": 0}, "pool_size=0"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"kernel_size": [5, 5, 5]}, "kernel_size=[5, 5, 5]"),  # three kernels for two conv layers
        ({"padding": [0]}, "padding=[0]"),
        ({"stride": 0}, "stride=0"),
        ({"pools": "mx"}, "pools='mx'"),
        ({"pools": "mmm"}, "pools='mmm'"),
        ({"fc_hidden": [16, 0]}, "fc_hidden=[16, 0]"),
        ({"channels": []}, "channels=[]"),
        ({"channels": [32, 0]}, "channels=[32, 0]"),
        ({"padding": 5}, "padding=5"),
        ({"padding": -1}, "padding=-1"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"input_channels": 0}, "input_channels=0"),
        ({"activation": "relu"}, "activation='relu'"),
        ({"readout_gradient": "nudged"}, "readout_gradient='nudged' applies to readout='ce' only"),
        ({"readout": "ce", "readout_gradient": "both"}, "readout_gradient='both'"),
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
@pytest.mark.parametrize("readout", list(READOUTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("activation", ["identity", "hard_sigmoid", "sigmoid", "half_slope_hard_sigmoid"])
def test_step_equals_sigma_of_autograd_dphi(geometry: str, activation: str, readout: str) -> None:
    """s_{t+1} = σ(∂Φ/∂s(s_t)) for every layer, conv and fc layers included (identity σ checks ∂Φ/∂s itself)."""
    model = make(geometry, activation, readout=readout)
    x, state = random_input(model, 3), random_state(model, 3)
    sigma, _ = get_activation(activation)
    # autograd routes s_{i+1}'s gradient through the argmax of the max pooling at the *current* s_i, through the
    # average pool's and the strided convolution's adjoints: what the closed-form feedback must reproduce.
    expected = reference.prototypical_step(model, x, state, sigma)
    with torch.no_grad():
        got = model.step(state, model.drive(x))
    assert [tuple(g.shape) for g in got] == [tuple(s.shape) for s in state]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("activation", ["tanh", "logistic", "centered_hard_sigmoid"])
def test_step_with_the_other_activations(activation: str) -> None:
    model = make("pools_strides_fc", activation, readout="ce")
    x, state = random_input(model, 3), random_state(model, 3)
    expected = reference.prototypical_step(model, x, state, get_activation(activation)[0])
    with torch.no_grad():
        got = model.step(state, model.drive(x))
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


@pytest.mark.parametrize("readout", list(READOUTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_nudged_step(geometry: str, readout: str) -> None:
    """With β: mse o ← σ(∂Φ/∂o) + β(y − o) (outside σ) or σ(∂Φ/∂o + β(y − o)) (``nudge_inside``); ce: the last
    dynamical layer gets β(−∂ℓ/∂s) inside σ; the other layers are not nudged."""
    beta = 0.4
    model = make(geometry, "hard_sigmoid", readout=readout)
    x, state = random_input(model, 3), random_state(model, 3)
    target = model.encode_target(torch.tensor([0, 2, 4]), x)
    sigma, _ = get_activation("hard_sigmoid")
    inside = readout != "mse"
    expected = reference.prototypical_step(model, x, state, sigma, beta=beta, target=target, nudge_inside=inside)
    with torch.no_grad():
        got = model.step(state, model.drive(x), beta, target)
        free = model.step(state, model.drive(x))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    assert not torch.allclose(got[-1], free[-1]), "the nudge must move the last layer for this test to mean anything"
    if readout == "mse":  # the two conventions differ where σ clips or bends the nudged pre-activation
        inside_model = make(geometry, "hard_sigmoid", readout="mse_inside")
        with torch.no_grad():
            other = inside_model.step(state, inside_model.drive(x), beta, target)
        assert not torch.allclose(got[-1], other[-1])


def test_per_sample_beta_nudges_each_sample_with_its_own_beta() -> None:
    """Symmetric nudging relaxes (+β; −β) as one doubled batch: a per-sample β tensor gives each half the step of
    its own float β (mse inside σ and ce)."""
    for readout in ("mse_inside", "ce"):
        model = make("pools_strides_fc", "sigmoid", readout=readout)
        x, state = random_input(model, 2), random_state(model, 2)
        target = model.encode_target(torch.tensor([1, 3]), x)
        beta = torch.tensor([[0.5], [-0.5]], dtype=torch.float64)
        with torch.no_grad():
            both = model.step(state, model.drive(x), beta, target)
            plus = model.step(state, model.drive(x), 0.5, target)
            minus = model.step(state, model.drive(x), -0.5, target)
        for b, p, m in zip(both, plus, minus):
            torch.testing.assert_close(b[:1], p[:1], **TOL)
            torch.testing.assert_close(b[1:], m[1:], **TOL)


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


def test_relaxation_leaves_the_drive_unchanged() -> None:
    """Activations are applied in place on the pre-activations a step owns, never on the drive (a one-layer net with
    no feedback into its only layer is the case where the pre-activation IS the drive)."""
    for kwargs in ({"channels": [3], "input_size": 8, "readout": "ce"}, {"channels": [3], "input_size": 8}):
        model = ConvPrototypicalNet(**kwargs, activation="sigmoid").double()
        x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            drive = model.drive(x)
            kept = drive.clone()
            relax(model, drive, model.init_state(x), 3)
        torch.testing.assert_close(drive, kept, rtol=0, atol=0)


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


@pytest.mark.parametrize(
    ("geometry", "activation", "names"),
    [
        ("three_conv_padded", "sigmoid", ["convs.1.weight", "convs.2.weight", "fc.weight"]),
        ("pools_strides_fc", "sigmoid", ["convs.1.weight", "convs.2.weight", "fc_hidden.0.weight", "fc.weight"]),
        ("pools_strides_fc", "half_slope_hard_sigmoid", ["convs.1.weight", "convs.2.bias", "fc.bias"]),
    ],
)
def test_steps_gradcheck_through_pooling(geometry: str, activation: str, names: list[str]) -> None:
    """gradcheck (finite differences vs autograd) of 2 steps w.r.t. conv, fc-hidden and output parameters: the graph
    that BPTT back-propagates through (max / average pooling, unpooling, strided conv_transpose, in-place σ) is
    correct. Uniform random states keep pooling windows tie-free and pre-activations off the hard sigmoid's kinks
    (almost surely), so the function is smooth at the check point."""
    model = make(geometry, activation)
    x, state = random_input(model, 2), random_state(model, 2)
    drive = model.drive(x).detach()
    base = {n: p.detach() for n, p in model.named_parameters()}

    def f(*ws: torch.Tensor) -> torch.Tensor:
        params = dict(base, **dict(zip(names, ws)))
        return torch.cat([t.flatten() for t in _steps(model, params, state, drive, 2)])

    inputs = tuple(base[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# --- learning rule -------------------------------------------------------------------------------------------
def pool_adjoint(model: ConvPrototypicalNet, i: int, conv_out: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """P_iᵀ(above) from the definitions: max: ``above`` at the argmax of each window of ``conv_out``; average:
    above/k² on every position of its window; none: ``above``."""
    k, kind = model.pool_size, model.geometry[i].pool
    if kind == "m":
        _, ind = F.max_pool2d(conv_out, k, return_indices=True)
        return F.max_unpool2d(above, ind, k, output_size=conv_out.shape[-2:])
    if kind == "a":
        return above.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3) / (k * k)
    return above


def hand_dphi_dtheta(
    model: ConvPrototypicalNet, x: torch.Tensor, state: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    """Batch-summed ∂Φ/∂θ in ``model.parameters()`` order, by the formulas of Ernoult et al. (appendix E) with strides:

    ∂Φ/∂W_i[o, c, a, b] = Σ_{batch, y, z} u_i[o, y, z] · pad(s_{i−1})[c, s·y + a, s·z + b]   (a strided correlation,
    written with ``unfold``), u_i = P_iᵀ(s_i) at this state;  ∂Φ/∂b_i = Σ u_i;  ∂Φ/∂W_j = h_jᵀ h_{j−1};
    ∂Φ/∂b_j = Σ h_j,

    and for ``mse`` the output layer's ∂Φ/∂W_out = oᵀ h_M, ∂Φ/∂b_out = Σ o (``ce``: the read-out is not in Φ: zero).
    """
    n_conv = len(model.convs)
    below = [x] + list(state[: n_conv - 1])
    grads: list[torch.Tensor] = []
    for i, (s_low, s_high) in enumerate(zip(below, state[:n_conv])):
        conv, g = model.convs[i], model.geometry[i]
        u = pool_adjoint(model, i, conv(s_low), s_high)  # (B, O, c, c)
        patches = F.unfold(s_low, g.kernel, padding=g.padding, stride=g.stride)  # (B, C·k·k, c·c)
        weight = torch.einsum("bol,bpl->op", u.flatten(2), patches).reshape(conv.weight.shape)
        grads += [weight, u.sum(dim=(0, 2, 3))]
    layers = [state[n_conv - 1].flatten(1), *state[n_conv:]]
    for low, high in pairwise(layers):
        grads += [high.T @ low, high.sum(0)]
    if model.readout == "ce":
        grads += [torch.zeros_like(model.fc.weight), torch.zeros_like(model.fc.bias)]
    return grads


@pytest.mark.parametrize("readout", ["mse", "ce"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_hand_formula_matches_autograd_of_phi(geometry: str, readout: str) -> None:
    model = make(geometry, readout=readout)
    x, state = random_input(model, 3), random_state(model, 3)
    auto = torch.autograd.grad(model.phi(x, state).sum(), list(model.parameters()), materialize_grads=True)
    hand = hand_dphi_dtheta(model, x, state)
    assert len(auto) == len(hand)
    for a, h in zip(auto, hand):
        torch.testing.assert_close(a, h, **TOL)


@pytest.mark.parametrize("readout", list(READOUTS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_ep_surrogate_gradient_is_the_ep_update(geometry: str, readout: str) -> None:
    """−∇L_EP = Δθ = (1/(βB)) Σ_b (∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)), each term with its own state's pool indices."""
    beta, batch = 0.4, 3
    model = make(geometry, readout=readout)
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
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(-grad, (n - f) / (beta * batch), **TOL)


@pytest.mark.parametrize("betas", [(0.0, 0.5), (-0.5, 0.5), (0.0, -0.5)], ids=["one_sided", "symmetric", "negative"])
def test_readout_gradient_estimators(betas: tuple[float, float]) -> None:
    """``free``: the read-out's update is ∂ℓ̄/∂θ_out at s*; ``nudged`` (Laborieux et al.): [β_b ∂ℓ̄(s_b) − β_a ∂ℓ̄(s_a)]
    /(β_b − β_a), the read-out part of the EP difference of Φ − βℓ; only the read-out gets a gradient. Checked
    against the cross-entropy gradient written out: ∂ℓ̄/∂W_out = (1/B) Σ_b (softmax(z_b) − y_b) s_bᵀ."""
    geometry, batch = "pools_strides_fc", 3
    net_free = make(geometry, "sigmoid", readout="ce")
    torch.manual_seed(0)
    net_nudged = ConvPrototypicalNet(
        **GEOMETRIES[geometry], activation="sigmoid", readout="ce", readout_gradient="nudged"
    ).double()
    net_nudged.load_state_dict(net_free.state_dict())
    x = random_input(net_free, batch)
    target = net_free.encode_target(torch.tensor([0, 3, 4]), x)
    with torch.no_grad():
        drive = net_free.drive(x)
        free = relax(net_free, drive, net_free.init_state(x), 10)
        phases = {b: free if b == 0.0 else relax(net_free, drive, free, 4, b, target) for b in betas}

    def ce_grad(state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        h = state[-1].flatten(1)
        error = F.softmax(net_free.fc(h), dim=1) - target
        return error.T @ h / batch, error.sum(0) / batch

    params = list(net_free.parameters())
    pair = tuple((b, phases[b]) for b in betas)
    got_free = torch.autograd.grad(net_free.readout_loss(free, target, nudged=pair), params, materialize_grads=True)
    got_nudged = torch.autograd.grad(
        net_nudged.readout_loss(free, target, nudged=pair), list(net_nudged.parameters()), materialize_grads=True
    )
    (beta_a, s_a), (beta_b, s_b) = pair
    ga, gb = ce_grad(s_a), ce_grad(s_b)
    want_nudged = [(beta_b * b - beta_a * a) / (beta_b - beta_a) for a, b in zip(ga, gb)]
    for got, want in ((got_free, ce_grad(free)), (got_nudged, want_nudged)):
        assert all(float(g.abs().max()) == 0.0 for g in got[:-2])  # conv and hidden fc: no read-out gradient
        torch.testing.assert_close(got[-2], want[0], **TOL)
        torch.testing.assert_close(got[-1], want[1], **TOL)
    assert not torch.allclose(got_free[-2], got_nudged[-2]), "the two estimators must differ at β = 0.5"
    with pytest.raises(ValueError, match="needs the nudging pair"):
        net_nudged.readout_loss(free, target)


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


# --- GDU on the deep net (ep_lightning/gdu.py through the model's step, drive and phi) ----------------------------
def _deep_net(activation: str, weight_scale: float) -> tuple[ConvPrototypicalNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvPrototypicalNet(**GEOMETRIES["pools_strides_fc"], activation=activation, nudge_inside=True).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    return model, random_input(model, 4), torch.tensor([0, 2, 4, 1])


def test_exact_gdu_on_the_deep_conv_net_with_identity_sigma() -> None:
    """Every pooling kind, a strided convolution and an fc hidden layer, σ = identity (the transition is ∂Φ/∂s) and
    weights ×0.05 (contracting, converged in float64): EP's step-by-step updates equal BPTT's gradients up to O(β).
    Error = max over layers, parameters and steps of ‖Δ^EP(t) + ∇^BPTT(t)‖ / max_t ‖∇^BPTT(t)‖: measured 1.17e-3 →
    1.17e-4 at β = 1e-3 → 1e-4 (ratio 10.0); bounds [8, 12] allow for the O(β²) term. A wrong adjoint (pooling,
    output_padding) gives an O(1) error that does not shrink with β."""
    from ep_lightning.gdu import gdu_check

    model, x, labels = _deep_net("identity", 0.05)
    errors = []
    for beta in (1e-3, 1e-4):
        result = gdu_check(model, x, labels, T=300, K=8, beta=beta)
        assert max(result.free_residual) < 1e-12
        assert [tuple(n.shape) for n in result.ep_neurons] == [(8, *s) for s in model.init_state_shapes()]
        worst = 0.0
        for _, _, ep, bp in result.pairs():
            scale = max(float(bp[t].norm()) for t in range(result.K))
            worst = max(worst, max(float((ep[t] - bp[t]).norm()) / scale for t in range(result.K)))
        errors.append(worst)
    assert 8.0 < errors[0] / errors[1] < 12.0, errors
    assert errors[1] < 1e-3, errors


def test_practical_gdu_on_the_deep_conv_net() -> None:
    """Laborieux et al.'s activation (clamp(x/2, 0, 1)) and default-scale weights, β = 1e-3: the summed EP update of
    every parameter points along the BPTT gradient (measured: cosine ≥ 0.9999997, every sign agreeing). Bounds 0.999
    and 99 % as the GDU check on P-1h; a wrong sign or a shifted time index gives cosines near 0 or −1."""
    from ep_lightning.gdu import gdu_check, gdu_metrics

    model, x, labels = _deep_net("half_slope_hard_sigmoid", 1.0)
    result = gdu_check(model, x, labels, T=200, K=8, beta=1e-3)
    assert max(result.free_residual) < 1e-10
    metrics = gdu_metrics(result)
    for name in result.param_names:
        assert metrics[f"gdu/cosine/weights/{name}"] > 0.999, name
        assert metrics[f"gdu/sign/weights/{name}"] > 0.99, name
