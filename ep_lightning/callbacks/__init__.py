"""Callbacks: what a researcher sees (TensorBoard panels, one-line warnings), and the divergence policy.

``convergence`` (ConvergenceMonitor), ``gdu`` (GDUMonitor), ``initialization`` (InitializationMonitor) and
``divergence`` (DivergenceGuard) are the callbacks; ``measurements`` (what a snapshot measures), ``tensorboard``
(how it is written) and ``batches`` (the fixed batches) are what they share. The figures are ``ep_lightning.figures``.
"""

from ep_lightning.callbacks.convergence import ConvergenceMonitor
from ep_lightning.callbacks.divergence import DivergenceGuard
from ep_lightning.callbacks.gdu import GDUMonitor
from ep_lightning.callbacks.initialization import InitializationMonitor

__all__ = ["ConvergenceMonitor", "DivergenceGuard", "GDUMonitor", "InitializationMonitor"]
