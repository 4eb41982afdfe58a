"""Callbacks: what a researcher sees in TensorBoard, and the divergence guard."""

from ep_lightning.callbacks.convergence import ConvergenceMonitor
from ep_lightning.callbacks.divergence import DivergenceGuard
from ep_lightning.callbacks.gdu import GDUMonitor
from ep_lightning.callbacks.initialization import InitializationMonitor

__all__ = ["ConvergenceMonitor", "DivergenceGuard", "GDUMonitor", "InitializationMonitor"]
