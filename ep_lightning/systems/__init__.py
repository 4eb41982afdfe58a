"""LightningModules: how a network learns.

``EnergySystem`` (the harness and the phase runner) ← ``EstimatorSystem`` (the EP / BPTT training step) ←
``EquilibriumModule`` (from the net's own initial state) and ``InitializedEP`` (from an initializer's prediction);
``InitializerDistillation`` (an initializer for a frozen, trained net) builds on ``EnergySystem``.
"""

from ep_lightning.systems.base import EnergySystem
from ep_lightning.systems.equilibrium import EquilibriumModule
from ep_lightning.systems.estimator import EstimatorSystem
from ep_lightning.systems.initialized import InitializedEP, InitializerDistillation

__all__ = [
    "EnergySystem",
    "EquilibriumModule",
    "EstimatorSystem",
    "InitializedEP",
    "InitializerDistillation",
]
