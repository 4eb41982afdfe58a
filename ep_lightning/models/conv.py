"""Convolutional prototypical networks: Ernoult et al. 2019's P-conv and Laborieux et al. 2021's deep VGG-like
``P_CNN`` are configurations of one family.

Layers, input → output: conv layers s_1 … s_L (channels × side × side), each the pooled convolution of the layer
below (per-layer kernel, stride and padding; pooling 'm' max or 'a' average over pool_size × pool_size windows with
stride pool_size, or 'i' none), then fully connected hidden layers h_1 … h_M, then the output o (``readout: mse``) or
a softmax read-out outside the dynamics (``readout: ce``). The feedback from a layer into the one below is exactly
∂Φ/∂s of the coupling term: the adjoint of the pooling (max: unpooling at the argmax of the *current* state; average:
each value spread uniformly over its window; none: identity), then the transposed convolution (with the
output_padding that restores the side of the layer below when the stride drops rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ep_lightning.models.activations import ActivationName, get_activation, get_fused_activation
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import Beta, add_nudge
from ep_lightning.models.readout import (
    ReadoutGradient,
    ReadoutName,
    SoftmaxReadoutMixin,
    check_readout,
    check_readout_gradient,
)

#: Pooling letters (Laborieux et al.'s ``--pools``): max, average, none.
POOL_KINDS: dict[str, str] = {"m": "max", "a": "average", "i": "none"}


@dataclass(frozen=True)
class ConvLayerGeometry:
    """One conv layer: a ``below`` × ``below`` input, its convolution (kernel, stride, padding) of side ``conv``, the
    pooling of kind ``pool`` giving the state's ``side``; ``output_padding`` makes convᵀ return a ``below`` map."""

    kernel: int
    stride: int
    padding: int
    pool: str
    below: int
    conv: int
    side: int
    output_padding: int


def per_layer(field: str, value: int | Sequence[int], n: int, low: int) -> list[int]:
    """``value`` as one integer ≥ ``low`` per conv layer (a single integer is used for every layer)."""
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise ValueError(
            f"{field}={list(values)} has {len(values)} entries but channels has {n} conv layers: give one value per "
            f"conv layer (input → output) or a single integer for all"
        )
    for v in values:
        if isinstance(v, bool) or int(v) != v or v < low:
            raise ValueError(f"{field}={value} is invalid: use integers ≥ {low}")
    return [int(v) for v in values]


def per_layer_pools(pools: str | Sequence[str], n: int) -> list[str]:
    """``pools`` as one letter of ``POOL_KINDS`` per conv layer (one letter is used for every layer)."""
    letters = list(pools)
    if len(letters) == 1:
        letters = letters * n
    if len(letters) != n or any(p not in POOL_KINDS for p in letters):
        raise ValueError(
            f"pools={pools!r} is invalid: give one letter per conv layer ({n}), each 'm' (max), 'a' (average) or "
            f"'i' (none), e.g. {'m' * n!r}, or a single letter for all"
        )
    return letters


def conv_geometry(
    input_size: int,
    channels: Sequence[int],
    kernels: Sequence[int],
    strides: Sequence[int],
    paddings: Sequence[int],
    pools: Sequence[str],
    pool_size: int,
    given: str,
) -> list[ConvLayerGeometry]:
    """Geometry of every conv layer, input → output: conv side c_i = ⌊(h_{i−1} + 2p_i − k_i)/s_i⌋ + 1, state side
    h_i = c_i / pool_size for 'm' and 'a' pools (c_i must be a positive multiple of pool_size), h_i = c_i for 'i'
    (h_0 = input_size). Raises a ValueError quoting the fields as given (``given``) if a layer does not fit."""
    layers = []
    side = input_size
    for i in range(len(channels)):
        k, s, p, pool = kernels[i], strides[i], paddings[i], pools[i]
        span = side + 2 * p - k
        conv = span // s + 1 if span >= 0 else 0
        pooled = pool != "i"
        if conv < 1 or pooled and (conv < pool_size or conv % pool_size):
            need = f"must be a positive multiple of pool_size={pool_size}" if pooled else "must be at least 1"
            raise ValueError(
                f"conv geometry does not fit: {given}: conv layer {i + 1} gets a {side}×{side} input and its "
                f"{k}×{k} convolution (stride {s}, padding {p}) gives a side of {conv}, which {need} (use fewer "
                f"channels entries, a smaller kernel_size or pool_size, padding, or another pooling)"
            )
        layers.append(
            ConvLayerGeometry(
                kernel=k,
                stride=s,
                padding=p,
                pool=pool,
                below=side,
                conv=conv,
                side=conv // pool_size if pooled else conv,
                output_padding=span - (conv - 1) * s,
            )
        )
        side = layers[-1].side
    return layers


class Argmax(NamedTuple):
    """Where a max pooling found its maxima: its input and the flat index h·W + w of each window's argmax."""

    pooled_input: Tensor
    indices: Tensor


#: ``relaxation_conv_dtype`` values and the dtype the relaxation's convolutions run in (None: the state's own).
CONV_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def convolve(
    conv: nn.Conv2d, below: Tensor, dtype: torch.dtype | None = None, transpose: bool = False, output_padding: int = 0
) -> Tensor:
    """conv(below), or convᵀ(below) (no bias, ``output_padding``) for ``transpose``, computed in ``dtype`` and cast
    back."""
    if dtype is None:
        if not transpose:
            return conv(below)
        return F.conv_transpose2d(
            below, conv.weight, stride=conv.stride, padding=conv.padding, output_padding=output_padding
        )
    weight = conv.weight.to(dtype)
    if transpose:
        out = F.conv_transpose2d(
            below.to(dtype), weight, stride=conv.stride, padding=conv.padding, output_padding=output_padding
        )
    else:
        bias = conv.bias.to(dtype) if conv.bias is not None else None
        out = F.conv2d(below.to(dtype), weight, bias, stride=conv.stride, padding=conv.padding)
    return out.to(below.dtype)


def relaxation_layout(t: Tensor) -> Tensor:
    """``t`` in the memory layout the relaxation runs in: channels-last for 4-d tensors on CPU (oneDNN's convolutions
    and torch's max-pool with indices run natively in it: docs/performance.md), unchanged otherwise. Layouts change
    strides, not values."""
    if t.dim() == 4 and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t


class ConvPrototypicalNet(SoftmaxReadoutMixin, EnergyModel):
    """Conv layers s_1 … s_L, fully connected hidden layers h_1 … h_M, an output o (``mse``) or a read-out (``ce``).

    State order is input → output: ``(s_1, …, s_L, h_1, …, h_M[, o])``; for the 2019 paper's P-conv, s_1 is 32×12×12
    (the paper's s_2), s_2 is 64×4×4 (the paper's s_1) and o has 10 units (the paper's s_0). With s_0 = x, P_i the
    i-th pooling, conv_i the i-th convolution (with bias) and W_j, b_j the fully connected layers (W_out, b_out last):

        Φ(x, s, θ) = Σ_i s_i · P_i(conv_i(s_{i−1})) + Σ_j h_j · (W_j h_{j−1} + b_j) + o · (W_out h_M + b_out)
                     (h_0 = flatten(s_L); no o term for ``ce``),

        ∂Φ/∂s_i = P_i(conv_i(s_{i−1})) + convᵀ_{i+1}(P_{i+1}ᵀ(s_{i+1}))  [+ reshape(W_1ᵀ h_1) for i = L],
        ∂Φ/∂h_j = W_j h_{j−1} + b_j + W_{j+1}ᵀ h_{j+1},          ∂Φ/∂o = W_out h_M + b_out,

    where P_{i+1}ᵀ is the adjoint of the pooling at the current state (max: unpooling at the argmax indices of
    P_{i+1} at conv_{i+1}(s_i)). The transition is s ← σ(∂Φ/∂s) for every layer (synchronous, dt = 1). The input term
    P_1(conv_1(x)) is constant during the relaxation and computed once per batch (``drive``).

    Nudging, ``mse`` (cost ½‖o − y‖²): o ← σ(∂Φ/∂o) + β(y − o), outside σ, as in Ernoult et al.'s code (default), or
    o ← σ(∂Φ/∂o + β(y − o)) with ``nudge_inside`` (s ← σ(∂(Φ − βℓ)/∂s), Laborieux et al.'s code). ``ce``
    (``models/readout.py``): the last dynamical layer gets the read-out's nudge inside σ, s ← σ(∂Φ/∂s + β·W_outᵀ(y −
    softmax(W_out s + b_out))), reshaped to the layer.
    """

    def __init__(
        self,
        input_size: int = 28,
        input_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        kernel_size: int | Sequence[int] = 5,
        padding: int | Sequence[int] = 0,
        pool_size: int = 2,
        num_classes: int = 10,
        activation: ActivationName = "hard_sigmoid",
        readout: ReadoutName = "mse",
        relaxation_conv_dtype: Literal["float32", "bfloat16"] = "float32",
        stride: int | Sequence[int] = 1,
        pools: str = "m",
        fc_hidden: Sequence[int] = (),
        nudge_inside: bool = False,
        readout_gradient: ReadoutGradient = "free",
    ) -> None:
        """
        Args:
            input_size: side of the square input image (28 for MNIST, 32 for CIFAR).
            input_channels: channels of the input image (1 for MNIST, 3 for CIFAR).
            channels: output channels of each conv layer, input → output (2019 P-conv: ``[32, 64]``; Laborieux et
                al.'s CIFAR-10 VGG: ``[128, 256, 512, 512]``).
            kernel_size: side of the square kernels, one per conv layer or one for all (2019: 5; VGG: 3).
            padding: zero padding of each convolution (one per layer or one for all), 0 ≤ padding < kernel_size
                (2019: 0; VGG: ``[1, 1, 1, 0]``).
            pool_size: side and stride of the square max / average pooling windows (both papers: 2).
            num_classes: units of the output layer (or of the read-out's logits).
            activation: σ (``models/activations.py``): ``hard_sigmoid`` clamp(x, 0, 1) (2019 P-conv),
                ``half_slope_hard_sigmoid`` clamp(x/2, 0, 1) (Laborieux et al.'s ``my_hard_sig``), ``sigmoid``,
                ``logistic``, ``centered_hard_sigmoid``, ``tanh``, ``identity``.
            readout: ``mse`` (the last fc layer is a dynamical output layer, cost ½‖o − y‖²) or ``ce`` (it is a
                softmax read-out outside the dynamics, cross-entropy cost; Laborieux et al. 2021). The learning rates
                stay one per layer: conv_1 … conv_L, the hidden fc layers, then the output (the read-out for ``ce``).
            relaxation_conv_dtype: dtype of the convolutions inside the relaxation steps (``step``): ``float32`` (the
                default, exact) or ``bfloat16`` (inputs and kernels rounded to bfloat16, products accumulated by the
                backend, results cast back: states, Φ and the EP update stay float32). Faster convolutions on
                hardware with bfloat16 arithmetic, at a cost in accuracy (speed and accuracy: docs/performance.md).
            stride: stride of each convolution, one per layer or one for all (both papers: 1).
            pools: pooling after each convolution, one letter per conv layer: ``m`` max, ``a`` average, ``i`` none
                (Laborieux et al.'s ``--pools``; VGG: ``mmmm``); a single letter applies to every layer.
            fc_hidden: sizes of the fully connected hidden layers between the last conv layer and the output, input →
                output (Laborieux et al.'s ``--fc`` without its last entry; both papers: none).
            nudge_inside: ``mse`` only: add the nudge β(y − o) inside σ (Laborieux et al.) instead of after it
                (Ernoult et al., the default). ``ce`` always nudges inside σ.
            readout_gradient: ``ce`` only: the read-out's update, ``free`` (cross-entropy gradient at s*, default) or
                ``nudged`` (the EP difference of Φ − βℓ at the nudged states, Laborieux et al.'s code); see
                ``models/readout.py``.
        """
        super().__init__()
        channels = [int(c) for c in channels]
        self._init_args: dict[str, Any] = {
            "input_size": int(input_size),
            "input_channels": int(input_channels),
            "channels": channels,
            "kernel_size": kernel_size if isinstance(kernel_size, int) else [int(k) for k in kernel_size],
            "padding": padding if isinstance(padding, int) else [int(p) for p in padding],
            "pool_size": int(pool_size),
            "num_classes": int(num_classes),
            "activation": activation,
            "readout": readout,
            "relaxation_conv_dtype": relaxation_conv_dtype,
            "stride": stride if isinstance(stride, int) else [int(t) for t in stride],
            "pools": pools,
            "fc_hidden": [int(h) for h in fc_hidden],
            "nudge_inside": bool(nudge_inside),
            "readout_gradient": readout_gradient,
        }
        for field, value, low in (
            ("input_size", input_size, 1),
            ("input_channels", input_channels, 1),
            ("pool_size", pool_size, 1),
            ("num_classes", num_classes, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{field}={value} is invalid: use an integer ≥ {low}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(
                f"channels={channels} is invalid: give the output channels of each conv layer, input → output, "
                f"every entry a positive integer (the 2019 P-conv: [32, 64])"
            )
        n = len(channels)
        kernels = per_layer("kernel_size", kernel_size, n, 1)
        strides = per_layer("stride", stride, n, 1)
        paddings = per_layer("padding", padding, n, 0)
        for k, p in zip(kernels, paddings):
            if p >= k:
                raise ValueError(
                    f"padding={padding} is invalid: use 0 ≤ padding < kernel_size={kernel_size} in every conv layer"
                )
        pool_letters = per_layer_pools(pools, n)
        hidden = [int(h) for h in fc_hidden]
        if any(h < 1 for h in hidden):
            raise ValueError(f"fc_hidden={hidden} is invalid: give positive layer sizes (or [] for none)")
        self.readout = check_readout(readout)
        self.readout_gradient = check_readout_gradient(readout_gradient)
        if self.readout_gradient != "free" and self.readout != "ce":
            raise ValueError(
                f"readout_gradient={readout_gradient!r} applies to readout='ce' only (with 'mse' the output layer's "
                f"weights are learned by the EP contrast); remove it or set readout: ce"
            )
        self.nudge_inside = bool(nudge_inside)
        if relaxation_conv_dtype not in CONV_DTYPES:
            raise ValueError(
                f"relaxation_conv_dtype={relaxation_conv_dtype!r} is not known; allowed: "
                f"{', '.join(map(repr, CONV_DTYPES))}"
            )
        self.relaxation_conv_dtype = relaxation_conv_dtype
        self._step_dtype = CONV_DTYPES[relaxation_conv_dtype]
        self.sigma, _ = get_activation(activation)
        self.fused = get_fused_activation(activation)
        self.activation_name = activation
        self.input_size, self.input_channels = int(input_size), int(input_channels)
        self.channels, self.pool_size, self.num_classes = channels, int(pool_size), int(num_classes)
        self.fc_hidden_sizes = hidden
        given = (
            f"input_size={input_size}, channels={channels}, kernel_size={kernel_size}, stride={stride}, "
            f"padding={padding}, pools={pools!r}, pool_size={pool_size}"
        )
        self.geometry = conv_geometry(
            self.input_size, channels, kernels, strides, paddings, pool_letters, self.pool_size, given
        )
        self.conv_sizes = [g.conv for g in self.geometry]
        self.state_sizes = [g.side for g in self.geometry]
        in_channels = [self.input_channels] + channels[:-1]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, g.kernel, stride=g.stride, padding=g.padding)
            for c_in, c_out, g in zip(in_channels, channels, self.geometry)
        )
        sizes = [channels[-1] * self.state_sizes[-1] ** 2, *hidden]
        self.fc_hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.fc = nn.Linear(sizes[-1], self.num_classes)

    # --- shapes ----------------------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_channels, self.input_size, self.input_size)

    @property
    def init_args(self) -> dict[str, Any]:
        return dict(self._init_args)

    def init_state_shapes(self) -> list[tuple[int, ...]]:
        shapes = [(c, h, h) for c, h in zip(self.channels, self.state_sizes)] + [(h,) for h in self.fc_hidden_sizes]
        return shapes if self.readout == "ce" else shapes + [(self.num_classes,)]

    def init_state(self, x: Tensor) -> State:
        """Zeros; on CPU the conv layers in channels-last memory layout (``relaxation_layout``)."""
        w = self.fc.weight
        shapes = self.init_state_shapes()
        return tuple(
            relaxation_layout(torch.zeros(x.shape[0], *shape, dtype=w.dtype, device=w.device)) for shape in shapes
        )

    def _image(self, x: Tensor) -> Tensor:
        """x as (B, input_channels, input_size, input_size); flat (B, C·H·W) inputs are reshaped."""
        shape = (self.input_channels, self.input_size, self.input_size)
        if x.shape[1:] != shape:
            if x[0].numel() != self.input_channels * self.input_size**2:
                raise ValueError(
                    f"input of shape {tuple(x.shape)} does not fit the model: expected "
                    f"(batch, {', '.join(map(str, shape))}) "
                    f"(input_channels={self.input_channels}, input_size={self.input_size})"
                )
            x = x.reshape(x.shape[0], *shape)
        return x

    # --- dynamics --------------------------------------------------------------------------------------------
    def _pool(self, i: int, below: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Argmax | None]:
        """P_i(conv_i(below)) and, for a max pool, where its maxima are (``Argmax``; i is 0-based; the convolution in
        ``dtype``).

        The pooling runs in the layout of ``relaxation_layout`` (channels-last on CPU, where torch's max-pool with
        indices is much faster for these shapes: docs/performance.md); values and indices do not depend on the layout
        (a max is exact, the index is h·W + w in either)."""
        out = relaxation_layout(convolve(self.convs[i], below, dtype))
        kind, k = self.geometry[i].pool, self.pool_size
        if kind == "i":
            return out, None
        if kind == "a":
            return F.avg_pool2d(out, k, stride=k), None
        pooled, indices = F.max_pool2d(out, k, stride=k, return_indices=True)
        return pooled, Argmax(out, indices)

    def _feedback(self, i: int, above: Tensor, argmax: Argmax | None, dtype: torch.dtype | None = None) -> Tensor:
        """convᵀ_i(P_iᵀ(above)) = ∂/∂s_{i−1} of above · P_i(conv_i(s_{i−1})) (i is 0-based): P_iᵀ puts each value at
        the argmax of its window (max; torch's max-pool backward: the same scatter as ``max_unpool2d``, faster),
        spreads it as 1/k² over its k × k window (average), or is the identity."""
        g, k = self.geometry[i], self.pool_size
        if g.pool == "m":
            above = torch.ops.aten.max_pool2d_with_indices_backward(
                above, argmax.pooled_input, [k, k], [k, k], [0, 0], [1, 1], False, argmax.indices
            )
        elif g.pool == "a":
            above = F.interpolate(above, scale_factor=k, mode="nearest").mul_(1.0 / (k * k))
        return convolve(self.convs[i], above, dtype, transpose=True, output_padding=g.output_padding)

    def _activate(self, pre: Tensor) -> Tensor:
        """σ(pre), computed in place on ``pre`` (a tensor the step owns) as g(a·pre + c) (``FusedActivation``)."""
        a, c, activate = self.fused
        if a != 1.0:
            pre.mul_(a)
        if c != 0.0:
            pre.add_(c)
        return activate(pre) if activate is not None else pre

    def drive(self, x: Tensor) -> Tensor:
        """P_1(conv_1(x)), the constant input term of the first layer (in ``relaxation_layout``)."""
        return self._pool(0, relaxation_layout(self._image(x)))[0]

    def readout_layer(self) -> nn.Linear:
        """The softmax read-out W_out, b_out (``readout='ce'``)."""
        return self.fc

    def step(self, state: State, drive: Tensor, beta: Beta = 0.0, target: Tensor | None = None) -> State:
        """s ← σ(∂Φ/∂s) for every layer from the old state (class docstring), with the nudge: ``mse`` o ← σ(∂Φ/∂o) +
        β(y − o) (or σ(∂Φ/∂o + β(y − o)) with ``nudge_inside``); ``ce`` the last dynamical layer s ← σ(∂Φ/∂s +
        β reshape(W_outᵀ(y − softmax(W_out s + b_out))))."""
        nudged = target is not None
        ce = self.readout == "ce"
        n_conv, n_fc, last = len(self.convs), len(self.fc_hidden), len(state) - 1
        nudge = self.nudge(state, target) if nudged else None
        pooled, argmaxes = [drive], [None]
        for i in range(1, n_conv):
            p, argmax = self._pool(i, state[i - 1], self._step_dtype)
            pooled.append(p)
            argmaxes.append(argmax)
        above_fc = self.fc_hidden[0] if n_fc else None if ce else self.fc  # the fc layer fed by s_L
        new_state = []
        for i in range(n_conv):
            if i + 1 < n_conv:
                pre = pooled[i] + self._feedback(i + 1, state[i + 1], argmaxes[i + 1], self._step_dtype)
            elif above_fc is not None:
                pre = pooled[i] + (state[i + 1] @ above_fc.weight).view_as(state[i])
            else:
                pre = pooled[i].clone() if i == 0 else pooled[i]  # never activate the drive in place
            new_state.append(pre)
        below = state[n_conv - 1].flatten(1)
        for j, layer in enumerate(self.fc_hidden):
            pre = layer(below)
            if j + 1 < n_fc:
                pre.addmm_(state[n_conv + j + 1], self.fc_hidden[j + 1].weight)
            elif not ce:
                pre.addmm_(state[-1], self.fc.weight)
            new_state.append(pre)
            below = state[n_conv + j]
        if not ce:
            new_state.append(self.fc(below))
        if nudged and (ce or self.nudge_inside):  # the nudge inside σ
            new_state[last] = add_nudge(new_state[last], nudge, beta)
        new_state = [self._activate(pre) for pre in new_state]
        if nudged and not ce and not self.nudge_inside:  # mse: β(y − o) outside σ
            new_state[last] = add_nudge(new_state[last], nudge, beta)
        return tuple(new_state)

    def phi(self, x: Tensor, state: State) -> Tensor:
        """Φ = Σ_i s_i · P_i(conv_i(s_{i−1})) + Σ_j h_j · (W_j h_{j−1} + b_j) + o · (W_out h_M + b_out) per sample
        (s_0 = x, h_0 = flatten(s_L)); no o term for ``ce``."""
        below = self._image(x)
        total = state[0].new_zeros(state[0].shape[0])
        n_conv = len(self.convs)
        for i, s in enumerate(state[:n_conv]):
            total = total + (s * self._pool(i, below)[0]).flatten(1).sum(dim=1)
            below = s
        below = below.flatten(1)
        for layer, h in zip(self.fc_hidden, state[n_conv:]):
            total = total + (h * layer(below)).sum(dim=1)
            below = h
        if self.readout == "ce":  # the read-out is not part of Φ
            return total
        return total + (state[-1] * self.fc(below)).sum(dim=1)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """[conv_1, …, conv_L, fc_1, …, fc_M, output (or read-out)]: one learning rate each (2019 P-conv: 0.15,
        0.035, 0.015; Laborieux et al.'s VGG: 0.25, 0.15, 0.1, 0.08, 0.05)."""
        layers = [*self.convs, *self.fc_hidden, self.fc]
        return [list(layer.parameters()) for layer in layers]

    def state_names(self) -> list[str]:
        names = [f"conv{i + 1}" for i in range(len(self.convs))] + [f"fc{j + 1}" for j in range(len(self.fc_hidden))]
        return names if self.readout == "ce" else names + ["output"]
