"""Convolutional prototypical (P-conv) network (Ernoult et al. 2019, §4 and appendix E).

Conv layers with max-pooling, then one fully connected readout. The feedback from a pooled layer into the layer
below goes through the max-pool's indices (unpooling) and a transposed convolution: that is exactly ∂Φ/∂s of the
term s_{i+1} · P(conv(s_i)), with the argmax taken at the *current* s_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ep_lightning.models.activations import ActivationName, get_activation
from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import Beta, add_nudge
from ep_lightning.models.readout import ReadoutName, SoftmaxReadoutMixin, check_readout


def conv_pool_sizes(
    input_size: int, channels: Sequence[int], kernel_size: int, padding: int, pool_size: int
) -> tuple[list[int], list[int]]:
    """Spatial side of each conv output (before pooling) and of each pooled state, input → output.

    conv side c_i = h_{i−1} + 2·padding − kernel_size + 1, pooled side h_i = c_i / pool_size (h_0 = input_size).
    Raises a ValueError naming the fields if a side is not a positive multiple of ``pool_size``.
    """
    conv_sizes, pooled_sizes = [], []
    side = input_size
    for i in range(len(channels)):
        conv = side + 2 * padding - kernel_size + 1
        if conv < pool_size or conv % pool_size:
            raise ValueError(
                f"conv geometry does not fit: input_size={input_size}, channels={list(channels)}, "
                f"kernel_size={kernel_size}, padding={padding}, pool_size={pool_size}: conv layer {i + 1} gets a "
                f"{side}×{side} input and its {kernel_size}×{kernel_size} convolution gives a side of {conv}, which "
                f"must be a positive multiple of pool_size={pool_size} (use fewer channels entries, a smaller "
                f"kernel_size or pool_size, or padding)"
            )
        side = conv // pool_size
        conv_sizes.append(conv)
        pooled_sizes.append(side)
    return conv_sizes, pooled_sizes


#: ``relaxation_conv_dtype`` values and the dtype the relaxation's convolutions run in (None: the state's own).
CONV_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def convolve(conv: nn.Conv2d, below: Tensor, dtype: torch.dtype | None = None, transpose: bool = False) -> Tensor:
    """conv(below) (or convᵀ(below) without bias for ``transpose``), computed in ``dtype`` and cast back."""
    if dtype is None:
        return F.conv_transpose2d(below, conv.weight, padding=conv.padding) if transpose else conv(below)
    weight = conv.weight.to(dtype)
    if transpose:
        out = F.conv_transpose2d(below.to(dtype), weight, padding=conv.padding)
    else:
        bias = conv.bias.to(dtype) if conv.bias is not None else None
        out = F.conv2d(below.to(dtype), weight, bias, padding=conv.padding)
    return out.to(below.dtype)


class ConvPrototypicalNet(SoftmaxReadoutMixin, EnergyModel):
    """P-conv: conv + max-pool layers s_1 … s_L (channels × side × side), then a fully connected output o.

    State order is input → output: ``(s_1, …, s_L, o)``; for the paper's P-conv, s_1 is 32×12×12 (the paper's s_2),
    s_2 is 64×4×4 (the paper's s_1) and o has 10 units (the paper's s_0). With s_0 = x, P the max-pool and
    conv_i the i-th convolution (with bias):

        Φ(x, s, θ) = Σ_i s_i · P(conv_i(s_{i−1})) + o · (W_fc s_L + b_fc),

        ∂Φ/∂s_i = P(conv_i(s_{i−1})) + convᵀ_{i+1}(unpool(s_{i+1}; argmax indices of P at conv_{i+1}(s_i)))
                  [+ reshape(W_fcᵀ o) for i = L],
        ∂Φ/∂o   = W_fc s_L + b_fc,

    and the transition is s ← σ(∂Φ/∂s) for every layer (synchronous, dt = 1), plus β(y − o) on the output in the
    nudged phase (added outside σ, as in the authors' code). The input term P(conv_1(x)) is constant during the
    relaxation and computed once per batch (``drive``).

    ``readout='ce'`` (Laborieux et al. 2021): the fully connected layer is a softmax read-out outside the dynamics
    (``models/readout.py``): the state is (s_1, …, s_L), Φ has no output term, logits = W_fc s_L + b_fc, and the
    nudge reshape(W_fcᵀ(y − softmax(logits))) of s_L enters inside σ: s_L ← σ(∂Φ/∂s_L + β·nudge).
    """

    def __init__(
        self,
        input_size: int = 28,
        input_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 5,
        padding: int = 0,
        pool_size: int = 2,
        num_classes: int = 10,
        activation: ActivationName = "hard_sigmoid",
        readout: ReadoutName = "mse",
        relaxation_conv_dtype: Literal["float32", "bfloat16"] = "float32",
    ) -> None:
        """
        Args:
            input_size: side of the square input image (28 for MNIST).
            input_channels: channels of the input image (1 for MNIST).
            channels: output channels of each conv layer, input → output (the paper: ``[32, 64]``).
            kernel_size: side of the square convolution kernels (the paper: 5).
            padding: zero padding of every convolution, 0 ≤ padding < kernel_size (the paper: 0).
            pool_size: side and stride of the square max-pool (the paper: 2).
            num_classes: units of the fully connected output layer.
            activation: σ, one of ``hard_sigmoid`` (the paper's choice for P-conv), ``sigmoid``, ``tanh``,
                ``identity``.
            readout: ``mse`` (the fc output layer is a dynamical layer, cost ½‖o − y‖², the 2019 paper) or ``ce`` (the
                fc layer is a softmax read-out outside the dynamics, cross-entropy cost; Laborieux et al. 2021). The
                learning rates stay one per layer: conv_1 … conv_L, then fc (the read-out for ``ce``).
            relaxation_conv_dtype: dtype of the convolutions inside the relaxation steps (``step``): ``float32`` (the
                default, exact) or ``bfloat16`` (inputs and kernels rounded to bfloat16, products accumulated by the
                backend, results cast back: states, Φ and the EP update stay float32). Faster convolutions on
                hardware with bfloat16 arithmetic, at a cost in accuracy (speed and accuracy: docs/performance.md).
        """
        super().__init__()
        channels = [int(c) for c in channels]
        for field, value, low in (
            ("input_size", input_size, 1),
            ("input_channels", input_channels, 1),
            ("kernel_size", kernel_size, 1),
            ("pool_size", pool_size, 1),
            ("num_classes", num_classes, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{field}={value} is invalid: use an integer ≥ {low}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(
                f"channels={channels} is invalid: give the output channels of each conv layer, input → output, "
                f"every entry a positive integer (the paper: [32, 64])"
            )
        if int(padding) != padding or not 0 <= padding < kernel_size:
            raise ValueError(
                f"padding={padding} is invalid: use an integer with 0 ≤ padding < kernel_size={kernel_size}"
            )
        self.readout = check_readout(readout)
        if relaxation_conv_dtype not in CONV_DTYPES:
            raise ValueError(
                f"relaxation_conv_dtype={relaxation_conv_dtype!r} is not known; allowed: "
                f"{', '.join(map(repr, CONV_DTYPES))}"
            )
        self.relaxation_conv_dtype = relaxation_conv_dtype
        self._step_dtype = CONV_DTYPES[relaxation_conv_dtype]
        self.sigma, _ = get_activation(activation)
        self.activation_name = activation
        self.input_size, self.input_channels = int(input_size), int(input_channels)
        self.channels, self.kernel_size = channels, int(kernel_size)
        self.padding, self.pool_size = int(padding), int(pool_size)
        self.num_classes = int(num_classes)
        self.conv_sizes, self.state_sizes = conv_pool_sizes(
            self.input_size, channels, self.kernel_size, self.padding, self.pool_size
        )
        in_channels = [self.input_channels] + channels[:-1]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, self.kernel_size, padding=self.padding) for c_in, c_out in zip(in_channels, channels)
        )
        self.fc = nn.Linear(channels[-1] * self.state_sizes[-1] ** 2, self.num_classes)

    # --- shapes ----------------------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_channels, self.input_size, self.input_size)

    @property
    def init_args(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "input_channels": self.input_channels,
            "channels": list(self.channels),
            "kernel_size": self.kernel_size,
            "padding": self.padding,
            "pool_size": self.pool_size,
            "num_classes": self.num_classes,
            "activation": self.activation_name,
            "readout": self.readout,
            "relaxation_conv_dtype": self.relaxation_conv_dtype,
        }

    def init_state_shapes(self) -> list[tuple[int, ...]]:
        conv = [(c, h, h) for c, h in zip(self.channels, self.state_sizes)]
        return conv if self.readout == "ce" else conv + [(self.num_classes,)]

    def init_state(self, x: Tensor) -> State:
        w = self.fc.weight
        shapes = self.init_state_shapes()
        return tuple(torch.zeros(x.shape[0], *shape, dtype=w.dtype, device=w.device) for shape in shapes)

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
    def _pool(self, i: int, below: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """P(conv_i(below)) and the argmax indices of the pooling (i is 0-based; the convolution in ``dtype``).

        On CPU the pooling runs on a channels-last copy, where torch's max-pool with indices is much faster for these
        shapes (docs/performance.md); values and indices are the same (a max is exact, the index is h·W + w in either
        layout), and both come back contiguous."""
        out = convolve(self.convs[i], below, dtype)
        if out.device.type == "cpu":
            out = out.contiguous(memory_format=torch.channels_last)
            pooled, indices = F.max_pool2d(out, self.pool_size, stride=self.pool_size, return_indices=True)
            return pooled.contiguous(), indices.contiguous()
        return F.max_pool2d(out, self.pool_size, stride=self.pool_size, return_indices=True)

    def _feedback(self, i: int, above: Tensor, indices: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """convᵀ_i(unpool(above; indices)) = ∂/∂s_{i−1} of above · P(conv_i(s_{i−1})) (i is 0-based)."""
        side = self.conv_sizes[i]
        unpooled = F.max_unpool2d(above, indices, self.pool_size, stride=self.pool_size, output_size=(side, side))
        return convolve(self.convs[i], unpooled, dtype, transpose=True)

    def drive(self, x: Tensor) -> Tensor:
        """P(conv_1(x)), the constant input term of the first layer."""
        return self._pool(0, self._image(x))[0]

    def readout_layer(self) -> nn.Linear:
        """The softmax read-out W_fc, b_fc (``readout='ce'``)."""
        return self.fc

    def step(self, state: State, drive: Tensor, beta: Beta = 0.0, target: Tensor | None = None) -> State:
        """s_i ← σ(∂Φ/∂s_i) for all layers from the old state; o ← σ(W_fc s_L + b_fc) + β(y − o) (``mse``), or
        s_L ← σ(∂Φ/∂s_L + β reshape(W_fcᵀ(y − softmax(W_fc s_L + b_fc)))) (``ce``)."""
        nudged = target is not None
        ce = self.readout == "ce"
        n_conv = len(self.convs)
        pooled, indices = [drive], [None]
        for i in range(1, n_conv):
            p, ind = self._pool(i, state[i - 1], self._step_dtype)
            pooled.append(p)
            indices.append(ind)
        new_state = []
        for i in range(n_conv):
            if i + 1 < n_conv:
                pre = pooled[i] + self._feedback(i + 1, state[i + 1], indices[i + 1], self._step_dtype)
            elif not ce:
                pre = pooled[i] + (state[-1] @ self.fc.weight).view_as(state[i])
            elif nudged:  # ce: the read-out's nudge inside σ of the last conv layer
                pre = add_nudge(pooled[i], self.nudge(state, target), beta)
            else:
                pre = pooled[i]
            new_state.append(self.sigma(pre))
        if not ce:
            new_out = self.sigma(self.fc(state[n_conv - 1].flatten(1)))
            if nudged:
                new_out = add_nudge(new_out, self.nudge(state, target), beta)
            new_state.append(new_out)
        return tuple(new_state)

    def phi(self, x: Tensor, state: State) -> Tensor:
        """Φ = Σ_i s_i · P(conv_i(s_{i−1})) + o · (W_fc s_L + b_fc) per sample (s_0 = x); no o term for ``ce``."""
        below = self._image(x)
        total = state[0].new_zeros(state[0].shape[0])
        conv_states = state if self.readout == "ce" else state[:-1]
        for i, s in enumerate(conv_states):
            total = total + (s * self._pool(i, below)[0]).flatten(1).sum(dim=1)
            below = s
        if self.readout == "ce":  # the read-out is not part of Φ
            return total
        return total + (state[-1] * self.fc(below.flatten(1))).sum(dim=1)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """[conv_1, …, conv_L, fc]: one learning rate each (the paper: 0.15, 0.035, 0.015)."""
        return [list(conv.parameters()) for conv in self.convs] + [list(self.fc.parameters())]

    def state_names(self) -> list[str]:
        names = [f"conv{i + 1}" for i in range(len(self.convs))]
        return names if self.readout == "ce" else names + ["output"]
