"""Layered fully-connected energy-based (EB) networks: Hopfield-like energy, Euler steps on E.

Used for the EB rows of Ernoult et al. 2019 (ε = 0.2, paper sigmoid ρ, ``output_dynamics='linear'`` as in their code)
and, with ρ = hard sigmoid, ε = 0.5, c = 1 and ``output_dynamics='energy_gradient'`` (as in QUVA-Lab/init-eqprop),
for the equilibrating network of Initialized EP (O'Connor et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ep_lightning.models.activations import ActivationName, activation_and_scaled_derivative, get_activation
from ep_lightning.models.base import State
from ep_lightning.models.layered import LayeredNet, bilinear_contrast
from ep_lightning.models.nudging import Beta, add_nudge


class EnergyDrive(NamedTuple):
    """Constant terms of the EB dynamics for one batch.

    ``input``: W_0 ρ(x) + b_0 (drive of the first layer). ``anchor``/``anchor_strength``: optional s^f and λ of the
    Initialized-EP energy E^λ = E + (λ/2)Σ_n‖s_n − s^f_n‖² (``None``/0 for plain EP). ``weights``/``biases``:
    (W_1, …, W_L) and (b_1, …, b_L), read once per batch for ``step`` (shared by all samples: ``repeat_batch``
    does not double them).
    """

    input: Tensor
    anchor: State | None = None
    anchor_strength: float = 0.0
    weights: tuple[Tensor, ...] = ()
    biases: tuple[Tensor, ...] = ()

    SHARED_FIELDS = ("weights", "biases")


OutputDynamics = Literal["energy_gradient", "linear"]
OUTPUT_DYNAMICS: tuple[str, ...] = ("energy_gradient", "linear")


class EnergyBasedNet(LayeredNet):
    """EB network with layers ``[n_in, n_1, …, n_out]`` (input → output), h_0 = x, h_n = ``state[n-1]``:

        E(x, s, θ) = ½ Σ_n ‖h_n‖² − Σ_n ρ(h_{n+1}) · (W_n ρ(h_n) + b_n)                       (n ≥ 1 in the first sum)

    Transition (all layers from the old state), for every layer below the output:

        h ← h − ε ∂E/∂h,   −∂E/∂h_{n+1} = −h_{n+1} + ρ'(h_{n+1}) ⊙ (W_n ρ(h_n) + b_n + W_{n+1}ᵀ ρ(h_{n+2})),

    and for the output layer h_out = h_L, according to ``output_dynamics``:

        ``energy_gradient``:  h_out ← h_out + ε(−h_out + ρ'(h_out) ⊙ (W_{L−1} ρ(h_{L−1}) + b_{L−1}))   (= −ε ∂E/∂h_out)
        ``linear``:           h_out ← h_out + ε(−h_out + W_{L−1} ρ(h_{L−1}) + b_{L−1})                 (no ρ'(h_out))

    then, in the nudged phase, + ε β · 2c (y − h_out) on the output, and a clamp to [0, 1] if ``clamp``.

    ``energy_gradient`` is exact gradient descent on E (the GDU theorem's setting; also the dynamics of Initialized
    EP's reference code, QUVA-Lab/init-eqprop, whose step is the autograd gradient of an energy with ρ on every
    layer, output included). ``linear`` is the stepper of Ernoult et al.'s code (``EPcont``), used for the paper's
    EB rows: the output moves like a linear unit while the layer below still feels ρ(h_out), so this step is not
    the gradient of any energy; the EP update keeps ∂E/∂θ of the E above (as the authors' ``computeGradients``).

    With an anchor (Initialized EP) the gradient gains λ(h − s^f). ``phi`` returns −E, so the EP update is
    (1/β)(∂E/∂θ(s*) − ∂E/∂θ(s^β)).
    """

    def __init__(
        self,
        layers: Sequence[int] = (784, 512, 10),
        activation: ActivationName = "sigmoid",
        eps: float = 0.2,
        clamp: bool = True,
        cost_scale: float = 0.5,
        output_dynamics: OutputDynamics = "energy_gradient",
    ) -> None:
        """
        Args:
            layers: layer sizes from input to output, e.g. ``[784, 512, 10]`` for EB-1h.
            activation: ρ, one of ``sigmoid`` (paper), ``hard_sigmoid`` (Initialized EP), ``tanh``, ``identity``.
            eps: Euler step ε > 0 (0.2 in Ernoult et al., 0.5 in O'Connor et al.).
            clamp: clamp states to [0, 1] after every step (both papers); off for the tanh toy model.
            cost_scale: c in ℓ = c‖s_out − y‖² (½ in Ernoult et al., 1 in O'Connor et al.).
            output_dynamics: ``energy_gradient`` (h_out moves along −∂E/∂h_out, with ρ'(h_out)) or ``linear`` (no
                ρ'(h_out), the stepper of Ernoult et al.'s code); see the class docstring.
        """
        super().__init__(layers)
        if not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"eps={eps} is invalid: the Euler step ε must be a finite number > 0 (e.g. 0.2)")
        if not cost_scale > 0:
            raise ValueError(f"cost_scale={cost_scale} is invalid: use a positive factor (0.5 or 1)")
        if output_dynamics not in OUTPUT_DYNAMICS:
            raise ValueError(
                f"output_dynamics={output_dynamics!r} is not known; allowed: 'energy_gradient' (−ε∂E/∂s_out, with "
                f"ρ'(s_out)) or 'linear' (no ρ'(s_out), the authors' EPcont stepper)"
            )
        self.activation_name = activation
        self.rho, _ = get_activation(activation)
        self.eps = float(eps)
        self.clamp = bool(clamp)
        self.nudge_scale = self.eps
        self.cost_scale = float(cost_scale)
        self.output_dynamics = output_dynamics

    #: The Initialized-EP anchor enters ``drive`` (``anchor``, ``anchor_strength``).
    supports_anchor = True

    @property
    def init_args(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "activation": self.activation_name,
            "eps": self.eps,
            "clamp": self.clamp,
            "cost_scale": self.cost_scale,
            "output_dynamics": self.output_dynamics,
        }

    @property
    def step_sizes(self) -> dict[str, float]:
        return {"eps": self.eps}

    def drive(self, x: Tensor, anchor: State | None = None, anchor_strength: float = 0.0) -> EnergyDrive:
        """W_0 ρ(x) + b_0, plus the optional Initialized-EP anchor s^f with strength λ."""
        if anchor is not None:
            anchor = tuple(a.detach() for a in anchor)
        first, *above = self.synapses
        weights, biases = tuple(syn.weight for syn in above), tuple(syn.bias for syn in above)
        return EnergyDrive(first(self.rho(x.flatten(1))), anchor, float(anchor_strength), weights, biases)

    def step(self, state: State, drive: EnergyDrive, beta: Beta = 0.0, target: Tensor | None = None) -> State:
        """h ← clamp(h − ε ∂E/∂h [− ελ(h − s^f)] [+ εβ·2c(y − h_out)]), all layers from the old state, with
        ∂E/∂h_{n+1} = h_{n+1} − ρ'(h_{n+1}) ⊙ (W_n ρ(h_n) + b_n + W_{n+1}ᵀ ρ(h_{n+2})), built as
        h + (εk)(ρ'/k) ⊙ pre − ε h (one addmm, one addmm_, one addcmul per layer; ρ' = k·(ρ'/k), see
        ``activation_and_scaled_derivative``); with ``output_dynamics='linear'`` the output layer is h + ε pre − ε h.
        Nudged iff ``target``."""
        activated = [activation_and_scaled_derivative(self.activation_name, h) for h in state]
        weights, eps, last = drive.weights, self.eps, len(state) - 1
        anchored = drive.anchor is not None and drive.anchor_strength != 0.0
        linear_output = self.output_dynamics == "linear"
        new_state = []
        for n, h in enumerate(state):
            if n == 0:
                pre = drive.input if n == last else torch.addmm(drive.input, activated[1][0], weights[0])
            else:
                pre = torch.addmm(drive.biases[n - 1], activated[n - 1][0], weights[n - 1].T)
                if n < last:
                    pre.addmm_(activated[n + 1][0], weights[n])
            if n == last and linear_output:  # h + ε(pre − h): no ρ'(h_out)
                new = torch.add(h, pre, alpha=eps).sub_(h, alpha=eps)
            else:
                _, slope, scale = activated[n]
                new = torch.addcmul(h, slope, pre, value=eps * scale).sub_(h, alpha=eps)
            if anchored:
                new.sub_(h - drive.anchor[n], alpha=eps * drive.anchor_strength)
            new_state.append(new)
        if target is not None:
            new_state[-1] = add_nudge(new_state[-1], self.nudge(state, target), self.eps * beta)
        if self.clamp:  # in place on the fresh tensors, unless autograd records the step (BPTT)
            new_state = [h.clamp(0.0, 1.0) if h.requires_grad else h.clamp_(0.0, 1.0) for h in new_state]
        return tuple(new_state)

    def energy(self, x: Tensor, state: State) -> Tensor:
        """E(x, s, θ) per sample (without the anchor term, which does not depend on θ)."""
        below = self.rho(x.flatten(1))
        total = x.new_zeros(x.shape[0], dtype=state[0].dtype)
        for synapse, h in zip(self.synapses, state):
            rho_h = self.rho(h)
            total = total + 0.5 * h.pow(2).sum(dim=1) - (rho_h * synapse(below)).sum(dim=1)
            below = rho_h
        return total

    def phi(self, x: Tensor, state: State) -> Tensor:
        """Φ = −E(x, s, θ) per sample."""
        return -self.energy(x, state)

    def ep_contrast(self, x: Tensor, state_a: State, state_b: State, scale: float = 1.0) -> Tensor:
        """scale · Σ_batch [E(s_b) − E(s_a)] = Σ_n ⟨W_n, A_n⟩ + ⟨b_n, c_n⟩ on the activated layers u = ρ(h), u_0 = ρ(x),
        plus the θ-independent ½‖h‖² terms (kept so the value equals the default −E form)."""
        x_term = self.rho(x.flatten(1).to(state_a[0].dtype))
        with torch.no_grad():
            u_a = (x_term, *(self.rho(h) for h in state_a))
            u_b = (x_term, *(self.rho(h) for h in state_b))
            quadratic = 0.5 * sum(hb.pow(2).sum() - ha.pow(2).sum() for ha, hb in zip(state_a, state_b))
        return bilinear_contrast(self.synapses, u_a, u_b, scale) + scale * quadratic
