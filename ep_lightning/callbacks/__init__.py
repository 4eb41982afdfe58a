"""Callbacks: what a researcher sees in TensorBoard."""

from ep_lightning.callbacks.convergence import ConvergenceMonitor

__all__ = ["ConvergenceMonitor"]
