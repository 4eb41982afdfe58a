"""Gradient-Descending Updates (GDU): EP updates against BPTT gradients, step by step (Ernoult et al. 2019, Thm 1).

Both computations start from the same free-phase state s* = s_T (T free steps from ``init_state``).

EP, nudged phase s^β_0 = s*, s^β_{t+1} = step(s^β_t, β), for t = 0 … K−1 (batch means):

    Δ^EP_s(β, t) = (s^β_{t+1} − s^β_t) / (β · nudge_scale)           (nudge_scale = ε for EB models, 1 for P)
    Δ^EP_θ(β, t) = (∂Φ/∂θ(s^β_{t+1}) − ∂Φ/∂θ(s^β_t)) / β

BPTT, K free steps z_k = step(z_{k−1}; θ_k) from z_0 = s*, each with its own leaf copy θ_k of the parameters,
L = mean_batch ℓ(z_K, y), and ONE ``torch.autograd.grad`` over all states and all copies:

    ∇^BPTT_s(t) = ∂L/∂z_{K−t},     ∇^BPTT_θ(t) = ∂L/∂θ_{K−t}      (the gradient carried by the (K−t)-th step)

so Σ_t ∇^BPTT_θ(t) is the truncated-BPTT gradient through K steps and Σ_t Δ^EP_θ(t) the EP update applied in
training. The GDU property: Δ^EP(β, t) → −∇^BPTT(t) as β → 0 when the transition is ∂Φ/∂s (exactly, for a
converged free phase), approximately otherwise. Everything goes through the model's ``step``, ``drive``, ``phi``,
the phase runner ``relaxation.relax_phases`` (free and nudged phases, per-step states from its trace) and, for the
per-step BPTT copies, ``relaxation.relax``: no second relaxation loop, no second Φ. Figures: ``ep_lightning.figures``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.nudging import NudgingPair
from ep_lightning.protocols import NudgingSystem
from ep_lightning.relaxation import PhaseTrace, relax, relax_phases

__all__ = [
    "GDUResult",
    "average_metrics",
    "bptt_gradients",
    "cosine_similarity",
    "ep_updates",
    "gdu_check",
    "gdu_metrics",
    "gdu_settings",
    "normalized_rmse",
    "sign_agreement",
]


@dataclass
class GDUResult:
    """Per-step EP updates and (negated) BPTT gradients of one batch, each tensor shaped (K, *unit shape).

    ``ep_*`` hold Δ^EP(β, t), ``bptt_*`` hold −∇^BPTT(t), so the GDU property reads ``ep ≈ bptt``.
    Neurons are state layers input → output (``neuron_names``); parameters follow ``model.parameter_groups()``.
    """

    beta: float
    T: int
    K: int
    neuron_names: list[str]
    param_names: list[str]
    ep_neurons: list[Tensor]
    bptt_neurons: list[Tensor]
    ep_params: list[Tensor]
    bptt_params: list[Tensor]
    #: ‖s_T − s_{T−1}‖ per state layer (batch mean): how far the free phase is from a fixed point.
    free_residual: list[float] = field(default_factory=list)

    def pairs(self) -> Iterable[tuple[str, str, Tensor, Tensor]]:
        """(kind, name, ep, bptt) for every neuron layer ("neurons") and every parameter tensor ("weights")."""
        for name, ep, bp in zip(self.neuron_names, self.ep_neurons, self.bptt_neurons):
            yield "neurons", name, ep, bp
        for name, ep, bp in zip(self.param_names, self.ep_params, self.bptt_params):
            yield "weights", name, ep, bp


def named_parameter_list(model: EnergyModel) -> tuple[list[str], list[nn.Parameter]]:
    """Trainable parameters in ``parameter_groups()`` order (input → output) with their ``named_parameters`` names."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.parameter_groups()
    params = [p for group in groups for p in group if p.requires_grad]
    return [names[id(p)] for p in params], params


def ep_updates(
    model: EnergyModel, x: Tensor, target: Tensor, free: State, beta: float, K: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Δ^EP_s(β, t) per state layer and Δ^EP_θ(β, t) per parameter, t = 0 … K−1, batch means, shape (K, …).

    Nudged phase from s* by the phase runner (the pair (0, β); states kept by its trace); ∂Φ/∂θ at each s^β_t by
    autograd of ``model.phi``.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta} is invalid: the nudging strength must be > 0 (the GDU check needs β → 0⁺)")
    _, params = named_parameter_list(model)
    trace = PhaseTrace(phi=False, keep_states=True)
    with torch.no_grad():
        start = tuple(s.detach() for s in free)
        relax_phases(
            model, x, model.drive(x), start, 0, nudged_steps=K, betas=NudgingPair(0.0, beta), target=target, trace=trace
        )
    states = trace.nudged_b.states  # s^β_0 = s*, …, s^β_K
    scale = beta * float(model.nudge_scale)
    neurons = [
        torch.stack([(states[t + 1][n] - states[t][n]).mean(dim=0) for t in range(K)]) / scale for n in range(len(free))
    ]
    with torch.enable_grad():
        dphi = [
            torch.autograd.grad(model.phi(x, s).mean(), params, allow_unused=True, materialize_grads=True)
            for s in states
        ]
    weights = [torch.stack([dphi[t + 1][i] - dphi[t][i] for t in range(K)]) / beta for i in range(len(params))]
    return neurons, weights


class _OneStep(nn.Module):
    """``model.step`` with its own input drive, as a module so ``functional_call`` can swap the parameters."""

    def __init__(self, model: EnergyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, state: State) -> State:
        return self.model.step(state, self.model.drive(x))


class _StepwiseParameters:
    """Stand-in for the model inside ``relax``: the k-th call of ``step`` uses the k-th leaf copy θ_k of the
    parameters (input drive recomputed with θ_k) and records the state it starts from, graph kept.

    ``relax`` passes the input ``x`` where it would pass the drive.
    """

    def __init__(self, model: EnergyModel, copies: list[dict[str, Tensor]]) -> None:
        self.one_step = _OneStep(model)
        self.copies = copies
        self.inputs: list[State] = []

    def step(self, state: State, x: Tensor, beta: float = 0.0, target: Tensor | None = None) -> State:
        params = {f"model.{name}": p for name, p in self.copies[len(self.inputs)].items()}
        self.inputs.append(state)
        return functional_call(self.one_step, params, (x, state))


def bptt_gradients(
    model: EnergyModel, x: Tensor, target: Tensor, free: State, K: int
) -> tuple[list[Tensor], list[Tensor]]:
    """−∇^BPTT_s(t) per state layer and −∇^BPTT_θ(t) per parameter, t = 0 … K−1, shape (K, …).

    L = mean_batch ℓ(z_K, y) after K free steps from z_0 = s*; ∇_s(t) = ∂L/∂z_{K−t} summed over the batch
    (= batch mean of the per-sample gradient, matching the EP batch means), ∇_θ(t) = ∂L/∂θ_{K−t}. One backward
    pass: a single ``torch.autograd.grad`` with respect to all intermediate states and all K parameter copies.
    """
    names, params = named_parameter_list(model)
    copies = [{n: p.detach().clone().requires_grad_(True) for n, p in zip(names, params)} for _ in range(K)]
    stepper = _StepwiseParameters(model, copies)
    with torch.enable_grad():
        z0 = tuple(s.detach().clone().requires_grad_(True) for s in free)
        final = relax(stepper, x, z0, K)  # type: ignore[arg-type]
        states = stepper.inputs + [final]  # z_0 … z_K
        loss = model.cost(final, target).mean()
        flat_states = [s for state in states for s in state]
        flat_copies = [c[n] for c in copies for n in names]
        grads = torch.autograd.grad(loss, flat_states + flat_copies, allow_unused=True, materialize_grads=True)
    layers, n_params = len(free), len(names)
    g_states, g_copies = grads[: len(flat_states)], grads[len(flat_states) :]
    # ∇_s(t) = ∂L/∂z_{K−t}: state index K − t, layer n.
    neurons = [-torch.stack([g_states[(K - t) * layers + n].sum(dim=0) for t in range(K)]) for n in range(layers)]
    # ∇_θ(t) = ∂L/∂θ_{K−t}: copy k = K − t is used by the k-th step (list index k − 1).
    weights = [-torch.stack([g_copies[(K - t - 1) * n_params + i] for t in range(K)]) for i in range(n_params)]
    return neurons, weights


def gdu_check(model: EnergyModel, x: Tensor, labels_or_target: Tensor, T: int, K: int, beta: float) -> GDUResult:
    """Free phase (T steps) then EP updates and BPTT gradients for t = 0 … K−1 on one batch.

    ``labels_or_target``: class indices (B,) or an already-encoded target shaped like the output layer.
    """
    if T < 1:
        raise ValueError(f"T={T} is invalid: the free phase needs at least 1 step")
    if K < 1:
        raise ValueError(f"K={K} is invalid: compare at least 1 step (K ≥ 1)")
    target = labels_or_target
    if not torch.is_floating_point(target):
        w = next(model.parameters())
        target = model.encode_target(target, w)
    x = x.to(dtype=next(model.parameters()).dtype) if torch.is_floating_point(x) else x
    trace = PhaseTrace(phi=False)
    with torch.no_grad():
        free = relax_phases(model, x, model.drive(x), model.init_state(x), T, trace=trace).free
    ep_n, ep_w = ep_updates(model, x, target, free, beta, K)
    bp_n, bp_w = bptt_gradients(model, x, target, free, K)
    names, _ = named_parameter_list(model)
    return GDUResult(
        beta=float(beta),
        T=int(T),
        K=int(K),
        neuron_names=model.state_names(),
        param_names=names,
        ep_neurons=ep_n,
        bptt_neurons=bp_n,
        ep_params=ep_w,
        bptt_params=bp_w,
        free_residual=[float(r) for r in trace.free.residuals[-1]],
    )


def gdu_settings(system: L.LightningModule, T: int | None, K: int | None, beta: float | None) -> tuple[int, int, float]:
    """(T, K, β) for the check: the given values, else the system's own ``T``, ``K``, ``beta``."""
    if not isinstance(system, NudgingSystem):
        raise TypeError(
            f"gdu: {type(system).__name__} is not a system of ep_lightning.systems (it needs `net`, `T`, `K`, `beta`); "
            f"use e.g. ep_lightning.systems.EquilibriumModule"
        )
    return (
        int(system.T if T is None else T),
        int(system.K if K is None else K),
        float(system.beta if beta is None else beta),
    )


# --- metrics ---------------------------------------------------------------------------------------------------
def normalized_rmse(ep: Tensor, bptt: Tensor) -> float:
    """Mean over units of sqrt(Σ_t (n_t − d_t)²) / max(‖n‖, ‖d‖) (n = −∇^BPTT, d = Δ^EP, norms over t).

    Units where both series are identically zero (e.g. synapses from always-zero input pixels) are left out;
    NaN if no unit is left.
    """
    d = ep.reshape(ep.shape[0], -1).double()
    n = bptt.reshape(bptt.shape[0], -1).double()
    norm = torch.maximum(n.norm(dim=0), d.norm(dim=0))
    keep = norm > 0
    if not keep.any():
        return float("nan")
    return float(((n - d).norm(dim=0)[keep] / norm[keep]).mean())


def sign_agreement(ep: Tensor, bptt: Tensor) -> float:
    """Fraction of units whose summed updates Σ_t Δ^EP and Σ_t −∇^BPTT have the same sign (both zero counts)."""
    return float((torch.sign(ep.sum(dim=0)) == torch.sign(bptt.sum(dim=0))).double().mean())


def cosine_similarity(ep: Tensor, bptt: Tensor) -> float:
    """Cosine between the summed updates Σ_t Δ^EP and Σ_t −∇^BPTT, flattened (1 if both are zero)."""
    a, b = ep.sum(dim=0).flatten().double(), bptt.sum(dim=0).flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return 1.0 if a.norm() == b.norm() else 0.0
    return float(a @ b / denom)


def gdu_metrics(result: GDUResult, prefix: str = "gdu") -> dict[str, float]:
    """``{prefix}/{rmse|sign|cosine}/{neurons|weights}/{name}`` for every layer, plus the free-phase residual."""
    metrics: dict[str, float] = {}
    for kind, name, ep, bp in result.pairs():
        metrics[f"{prefix}/rmse/{kind}/{name}"] = normalized_rmse(ep, bp)
        metrics[f"{prefix}/sign/{kind}/{name}"] = sign_agreement(ep, bp)
        metrics[f"{prefix}/cosine/{kind}/{name}"] = cosine_similarity(ep, bp)
    metrics[f"{prefix}/free_residual"] = max(result.free_residual) if result.free_residual else float("nan")
    return metrics


def average_metrics(per_batch: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over batches (NaNs ignored)."""
    if not per_batch:
        return {}
    out = {}
    for key in per_batch[0]:
        values = torch.tensor([m[key] for m in per_batch], dtype=torch.float64)
        values = values[~values.isnan()]
        out[key] = float(values.mean()) if values.numel() else float("nan")
    return out
