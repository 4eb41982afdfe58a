"""Callbacks: what a researcher sees in TensorBoard."""

from ep_lightning.callbacks.convergence import ConvergenceMonitor
from ep_lightning.callbacks.divergence import DivergenceGuard
from ep_lightning.callbacks.gdu import GDUMonitor

__all__ = ["ConvergenceMonitor", "DivergenceGuard", "GDUMonitor"]
