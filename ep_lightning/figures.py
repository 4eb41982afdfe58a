"""The matplotlib figures of the monitors and of the GDU check, drawn once here (``matplotlib.figure.Figure``, no
pyplot state) and logged with ``SummaryWriter.add_figure`` (or saved with ``Figure.savefig``).

- ``relaxation_figure``: residual per layer (log scale) and Φ against the relaxation step t, the nudged phase(s)
  after the free one (ConvergenceMonitor);
- ``trajectory_figure``: the output units of a few samples against t (ConvergenceMonitor);
- ``feature_map_figure``: fixed-point feature maps of a conv layer (ConvergenceMonitor);
- ``residual_comparison_figure``: the free phase from an initializer's prediction against from zero
  (InitializationMonitor);
- ``gdu_curves_figure``, ``gdu_rmse_figure``: EP updates against BPTT gradients step by step (``gdu``, GDUMonitor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ep_lightning.gdu import GDUResult


class PhaseCurves(NamedTuple):
    """What ``relaxation_figure`` draws of one phase."""

    phase: str  # "free", "nudged" (at β_b) or "nudged_a" (at β_a, symmetric nudging)
    residuals: Tensor  # (steps, layers): batch-mean residual per layer
    total: Tensor  # (steps,): batch mean of the whole-state residual
    phi: Tensor  # (steps,): batch-mean Φ after each step (empty when not recorded)
    steps_to_tol: int


def _figure(width: float, height: float, dpi: int = 80) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def _positive(values: Tensor) -> np.ndarray:
    """float64 array with exact zeros (a fixed point reached to the last bit) as NaN: gaps on a log axis."""
    out = values.detach().double().cpu().numpy().copy()
    out[out <= 0] = np.nan
    return out


def relaxation_figure(phases: Sequence[PhaseCurves], names: Sequence[str], tolerance: float) -> Figure:
    """Residual per layer (log scale) and Φ against t; each nudged phase follows the free one at t = T+1 … T+K."""
    fig = _figure(10, 6)
    ax_res, ax_phi = fig.subplots(2, 1, sharex=True)
    free, nudged = phases[0], phases[1:]
    T = free.residuals.shape[0]
    styles = {"free": "-", "nudged": "--", "nudged_a": ":"}
    for rec in phases:
        offset = 0 if rec.phase == "free" else T
        style = styles.get(rec.phase, "--")
        t = np.arange(offset + 1, offset + rec.residuals.shape[0] + 1)
        for layer, name in enumerate(names):
            ax_res.semilogy(
                t, _positive(rec.residuals[:, layer]), style, color=f"C{layer}", label=f"{name} ({rec.phase})"
            )
        ax_res.semilogy(t, _positive(rec.total), style, color="k", lw=0.8, label=f"whole state ({rec.phase})")
        if rec.phi.numel():
            ax_phi.plot(t, rec.phi.detach().double().cpu().numpy(), style, color="C0", label=rec.phase)
    ax_res.axhline(tolerance, color="grey", lw=0.8, ls=":", label=f"tolerance {tolerance:g}")
    for ax in (ax_res, ax_phi):
        if nudged:
            ax.axvline(T + 0.5, color="red", lw=0.8, ls=":")
    steps = "; ".join(f"{rec.phase}: {rec.steps_to_tol}" for rec in nudged)
    ax_res.set(
        ylabel="‖s_t − s_{t−1}‖ (batch mean)",
        title=f"free phase: {free.steps_to_tol} steps to tolerance"
        + (f"; nudged phase (after the red line) {steps}" if nudged else ""),
    )
    ax_res.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_phi.set(xlabel="relaxation step t", ylabel="Φ (or −E), batch mean")
    ax_phi.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.subplots_adjust(left=0.09, right=0.8, top=0.94, bottom=0.08, hspace=0.06)  # tight_layout would draw twice
    return fig


def trajectory_figure(free_outputs: Tensor, nudged_outputs: Tensor | None, labels: Tensor) -> Figure:
    """Output units of the first samples against t = 0 … T (free; ``free_outputs``: (T+1, samples, n_out)) and
    T … T+K (nudged); the target unit is bold."""
    traj = free_outputs if nudged_outputs is None else torch.cat([free_outputs, nudged_outputs[1:]])
    traj = traj.detach().double().cpu()
    n = traj.shape[1]
    fig = _figure(4 * n, 3.2)
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
    T = free_outputs.shape[0] - 1
    t = np.arange(traj.shape[0])
    labels = labels[:n].cpu()
    predicted = free_outputs[-1].argmax(dim=1)
    for i, ax in enumerate(axes):
        for unit in range(traj.shape[2]):
            target = unit == int(labels[i])
            ax.plot(t, traj[:, i, unit].numpy(), color=f"C{unit % 10}", lw=2.5 if target else 0.9, label=f"unit {unit}")
        if nudged_outputs is not None:
            ax.axvline(T, color="red", lw=0.8, ls=":")
        ax.set(title=f"sample {i}: label {int(labels[i])}, predicted {int(predicted[i])}", xlabel="relaxation step t")
    axes[0].set_ylabel("output unit state")
    nudge = "; red line: nudge on)" if nudged_outputs is not None else ")"
    fig.suptitle("output units against t (bold: the target unit" + nudge, fontsize=9)
    axes[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.subplots_adjust(left=0.06, right=0.9, top=0.8, bottom=0.15, wspace=0.08)
    return fig


def feature_map_figure(x: Tensor, maps: Tensor, samples: int, channels: int, name: str) -> Figure:
    """Rows: samples (input image first); columns: the first ``channels`` feature maps of s* at layer ``name``."""
    samples = min(samples, maps.shape[0])
    channels = min(channels, maps.shape[1])
    show_input = x.ndim == 4 and x.shape[1] in (1, 3)
    cols = channels + int(show_input)
    fig = _figure(1.3 * cols, 1.3 * samples + 0.4)
    axes = np.array(fig.subplots(samples, cols, squeeze=False))
    maps = maps[:samples, :channels].detach().double().cpu()
    lo, hi = float(maps.min()), float(maps.max())
    for i in range(samples):
        if show_input:
            axes[i, 0].imshow(x[i].detach().double().cpu().permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
        for c in range(channels):
            axes[i, c + int(show_input)].imshow(maps[i, c].numpy(), cmap="viridis", vmin=lo, vmax=hi)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if show_input:
        axes[0, 0].set_title("input", fontsize=8)
    for c in range(channels):
        axes[0, c + int(show_input)].set_title(f"ch {c}", fontsize=8)
    fig.suptitle(f"s* at {name} (colour range {lo:.2g} … {hi:.2g})", fontsize=9)
    fig.tight_layout()
    return fig


def residual_comparison_figure(from_init: Tensor, from_zero: Tensor, names: Sequence[str]) -> Figure:
    """‖s_{t+1} − s_t‖ per layer against t (log scale), relaxing from s^f (solid) and from zero (dashed)."""
    fig = _figure(5.5, 3.5)
    ax = fig.subplots()
    steps = np.arange(1, from_init.shape[0] + 1)
    for layer, name in enumerate(names):
        line = ax.semilogy(steps, _positive(from_init[:, layer]), label=f"{name}, from s^f")[0]
        ax.semilogy(steps, _positive(from_zero[:, layer]), "--", color=line.get_color(), label=f"{name}, from 0")
    ax.set(xlabel="step t", ylabel="‖s_{t+1} − s_t‖ (batch mean)", title="free-phase residual: from s^f vs from 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _sample_units(ep: Tensor, bptt: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Up to ``count`` random flat unit indices among units with a non-zero series."""
    flat = torch.maximum(ep.reshape(ep.shape[0], -1).abs().amax(0), bptt.reshape(bptt.shape[0], -1).abs().amax(0))
    candidates = torch.nonzero(flat > 0).flatten()
    if candidates.numel() == 0:
        return candidates
    pick = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[pick].sort().values


def gdu_curves_figure(result: GDUResult, units: int = 5, seed: int = 0, weights_only_matrices: bool = True) -> Figure:
    """The paper's GDU figure: Δ^EP(β, t) (solid) and −∇^BPTT(t) (dashed) against t for ``units`` random neurons
    per state layer and synapses per weight tensor (biases omitted unless ``weights_only_matrices=False``)."""
    neuron_panels = [p for p in result.pairs() if p[0] == "neurons"]
    weight_panels = [p for p in result.pairs() if p[0] == "weights" and (not weights_only_matrices or p[2].dim() > 2)]
    cols = max(len(neuron_panels), len(weight_panels), 1)
    fig = _figure(4.2 * cols, 6.4, dpi=100)
    axes = np.array(fig.subplots(2, cols, squeeze=False))
    generator = torch.Generator().manual_seed(seed)
    t = np.arange(result.K)
    for row, panels in enumerate((neuron_panels, weight_panels)):
        for col in range(cols):
            ax = axes[row, col]
            if col >= len(panels):
                ax.axis("off")
                continue
            kind, name, ep, bp = panels[col]
            ep, bp = ep.detach().double().cpu(), bp.detach().double().cpu()
            idx = _sample_units(ep, bp, units, generator)
            e, b = ep.reshape(result.K, -1)[:, idx], bp.reshape(result.K, -1)[:, idx]
            for j in range(idx.numel()):
                (line,) = ax.plot(t, e[:, j].numpy(), "-", lw=1.5)
                ax.plot(t, b[:, j].numpy(), "--", lw=1.5, color=line.get_color())
            ax.set_title(f"{kind}: {name}", fontsize=9)
            ax.set_xlabel("t")
            ax.axhline(0.0, color="0.7", lw=0.5)
    axes.flat[0].plot([], [], "k-", label=r"$\Delta^{EP}(\beta, t)$")
    axes.flat[0].plot([], [], "k--", label=r"$-\nabla^{BPTT}(t)$")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"GDU: EP updates vs BPTT gradients (β = {result.beta:g}, T = {result.T}, K = {result.K})")
    fig.tight_layout()
    return fig


def gdu_rmse_figure(metrics: dict[str, float], prefix: str = "gdu") -> Figure:
    """Bar chart of the per-layer normalised RMSE (neurons and parameters), log scale."""
    keys = [k for k in metrics if k.startswith(f"{prefix}/rmse/")]
    labels = [k[len(f"{prefix}/rmse/") :].replace("neurons/", "s: ").replace("weights/", "θ: ") for k in keys]
    values = [metrics[k] for k in keys]
    fig = _figure(max(4.0, 0.7 * len(keys) + 1.5), 3.6, dpi=100)
    ax = fig.subplots()
    colors = ["tab:blue" if "/neurons/" in k else "tab:orange" for k in keys]
    ax.bar(range(len(keys)), values, color=colors)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("normalised RMSE")
    if values and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_title(r"GDU: normalised RMSE between $\Delta^{EP}$ and $-\nabla^{BPTT}$ per layer", fontsize=10)
    fig.tight_layout()
    return fig
