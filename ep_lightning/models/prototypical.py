"""Layered fully-connected prototypical (P) networks of any depth (Ernoult et al. 2019, §3.1 and appendix)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ep_lightning.models.activations import ActivationName, get_activation, get_fused_activation
from ep_lightning.models.base import State
from ep_lightning.models.layered import LayeredNet, bilinear_contrast
from ep_lightning.models.nudging import Beta, add_nudge
from ep_lightning.models.readout import ReadoutName, SoftmaxReadoutMixin, check_readout


class PrototypicalDrive(NamedTuple):
    """Per-batch constants of the P dynamics with σ(z) = g(a z + c): ``first`` = a(W_0 x + b_0) + c,
    ``biases[n-1]`` = a b_n + c for the layers above the first, ``weights`` = (W_1, …, W_L), the synapses above
    the input as used by ``step``, and ``transposed`` = (W_1ᵀ, …, W_Lᵀ) (views), all read once per batch instead of
    through the module tree (and a transpose) at every step.
    Only ``first`` depends on the sample (``SHARED_FIELDS`` tells ``repeat_batch`` not to repeat the others)."""

    first: Tensor
    biases: tuple[Tensor, ...]
    weights: tuple[Tensor, ...] = ()
    transposed: tuple[Tensor, ...] = ()

    SHARED_FIELDS = ("biases", "weights", "transposed")


class PrototypicalNet(SoftmaxReadoutMixin, LayeredNet):
    """Fully-connected P network with layers ``layers = [n_in, n_1, …, n_out]`` (input → output).

    With h_0 = x and h_n = ``state[n-1]``, the primitive function is

        Φ(x, s, θ) = Σ_n h_{n+1} · (W_n h_n + b_n),

    and the transition (synchronous, all layers from the old state) is

        h_{n+1} ← h_{n+1} + dt · (σ(∂Φ/∂h_{n+1}) − h_{n+1} + [output] β(y − h_out)),
        ∂Φ/∂h_{n+1} = W_n h_n + b_n + W_{n+1}ᵀ h_{n+2}.

    With dt = 1 (the paper) this is h ← σ(∂Φ/∂h), and the nudge is added outside σ as in the authors' code.
    The input drive W_0 x + b_0 is constant during relaxation (``drive``).

    ``readout='ce'`` (Laborieux et al. 2021): the last synapse is a softmax read-out outside the dynamics (see
    ``models/readout.py``). The state is then (h_1, …, h_{L}) without the output layer, Φ stops at h_L, and the
    nudge W_outᵀ(y − softmax(W_out h_L + b_out)) enters inside σ: h_L ← h_L + dt(σ(∂Φ/∂h_L + β·nudge) − h_L).
    """

    def __init__(
        self,
        layers: Sequence[int] = (784, 512, 10),
        activation: ActivationName = "sigmoid",
        dt: float = 1.0,
        readout: ReadoutName = "mse",
    ) -> None:
        """
        Args:
            layers: layer sizes from input to output, e.g. ``[784, 512, 10]`` for P-1h.
            activation: σ, one of ``sigmoid`` (the paper's 1/(1+e^{−4(x−½)})), ``hard_sigmoid``, ``tanh``, ``identity``.
            dt: leak of the update, in (0, 1]; 1 is the paper's discrete-time model.
            readout: ``mse`` (the output layer is a dynamical layer, cost ½‖s_out − y‖², the 2019 paper) or ``ce``
                (the last synapse is a softmax read-out outside the dynamics, cross-entropy cost, nudging through its
                gradient; Laborieux et al. 2021; needs at least one hidden layer). The learning-rate list keeps one
                entry per synapse, the read-out last.
        """
        super().__init__(layers)
        layers = self.layers
        if not (0.0 < dt <= 1.0) or not math.isfinite(dt):
            raise ValueError(f"dt={dt} is invalid: the leak must lie in (0, 1] (the paper uses dt=1)")
        self.readout = check_readout(readout)
        if readout == "ce" and len(layers) < 3:
            raise ValueError(
                f"layers={layers} is invalid with readout='ce': the read-out sits outside the dynamics, so give at "
                f"least one hidden layer, e.g. [784, 512, 10]"
            )
        self.activation_name = activation
        self.sigma, _ = get_activation(activation)
        self.fused = get_fused_activation(activation)
        self.dt = float(dt)
        self.nudge_scale = self.dt  # the nudge enters the leaky update as dt·β(y − s_out)

    @property
    def init_args(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "activation": self.activation_name, "dt": self.dt, "readout": self.readout}

    @property
    def step_sizes(self) -> dict[str, float]:
        return {"dt": self.dt}

    @property
    def n_dynamic(self) -> int:
        """Synapses inside Φ (all of them for mse; all but the read-out for ce) = number of dynamical layers."""
        return len(self.layers) - 1 if self.readout == "mse" else len(self.layers) - 2

    def readout_layer(self) -> nn.Linear:
        """The softmax read-out W_out, b_out (``readout='ce'``): the last synapse."""
        return self.synapses[-1]

    def state_names(self) -> list[str]:
        if self.readout == "ce":  # every state layer is hidden; the output is the read-out's logits
            return [f"layer{i + 1}" for i in range(self.n_dynamic)]
        return super().state_names()

    def drive(self, x: Tensor) -> PrototypicalDrive:
        """Constant terms: a(W_0 x + b_0) + c for the first layer, a b_n + c for the others (σ(z) = g(az + c)),
        and the weights W_1 … W_L (and their transposes) the steps multiply by."""
        a, c, _ = self.fused
        first, *above = self.synapses
        biases = tuple(syn.bias * a + c for syn in above[: self.n_dynamic - 1])
        weights = tuple(syn.weight for syn in above[: self.n_dynamic])
        first_drive = torch.addmm(first.bias * a + c, x.flatten(1), first.weight.T, alpha=a)
        return PrototypicalDrive(first_drive, biases, weights, tuple(w.T for w in weights))

    def step(self, state: State, drive: PrototypicalDrive, beta: Beta = 0.0, target: Tensor | None = None) -> State:
        """h_{n+1} ← σ(W_n h_n + b_n + W_{n+1}ᵀ h_{n+2}) for every layer from the old state (dt = 1), leaky with dt,
        plus the nudge on the last layer (``mse``: dt·β(y − s_out) outside σ; ``ce``: β·nudge inside σ);
        pre-activations built in place as a(…) + c with addmm/addmm_, σ applied in place. Nudged iff ``target``."""
        a, _, activate = self.fused
        weights, transposed, last = drive.weights, drive.transposed, len(state) - 1
        nudged = target is not None
        ce = self.readout == "ce"
        new_state = []
        for n, h in enumerate(state):
            if n == 0:  # a(W_0 x + b_0) + c [+ a W_1ᵀ h_2]
                pre = torch.addmm(drive.first, state[1], weights[0], alpha=a) if last else drive.first.clone()
            else:  # a(W_n h_n + b_n) + c [+ a W_{n+1}ᵀ h_{n+2}]
                pre = torch.addmm(drive.biases[n - 1], state[n - 1], transposed[n - 1], alpha=a)
                if n < last:
                    pre.addmm_(state[n + 1], weights[n], alpha=a)
            nudge_here = nudged and n == last
            if nudge_here and ce:  # CE: a(∂Φ/∂h_L + β·nudge) + c, the nudge inside σ
                pre = add_nudge(pre, self.nudge(state, target), a * beta)
            new = activate(pre) if activate is not None else pre  # σ(∂Φ/∂h)
            if self.dt != 1.0:
                new = torch.lerp(h, new, self.dt)  # h + dt(σ(∂Φ/∂h) − h)
            if nudge_here and not ce:  # MSE: dt·β(y − s_out) outside σ
                new = add_nudge(new, self.nudge(state, target), self.dt * beta)
            new_state.append(new)
        return tuple(new_state)

    def phi(self, x: Tensor, state: State) -> Tensor:
        """Φ(x, s, θ) = Σ_n h_{n+1} · (W_n h_n + b_n) per sample."""
        below = x.flatten(1)
        total = x.new_zeros(x.shape[0], dtype=state[0].dtype)
        for synapse, h in zip(self.synapses, state):
            total = total + (h * synapse(below)).sum(dim=1)
            below = h
        return total

    def ep_contrast(self, x: Tensor, state_a: State, state_b: State, scale: float = 1.0) -> Tensor:
        """scale · Σ_batch [Φ(s_a) − Φ(s_b)] as Σ_n ⟨W_n, A_n⟩ + ⟨b_n, c_n⟩ (``bilinear_contrast``)."""
        x = x.flatten(1).to(state_a[0].dtype)
        return bilinear_contrast(self.synapses[: self.n_dynamic], (x, *state_a), (x, *state_b), scale)
