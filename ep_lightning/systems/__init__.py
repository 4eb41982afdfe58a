"""LightningModules: how a network learns."""

from ep_lightning.systems.base import EnergySystem, EPSystem
from ep_lightning.systems.equilibrium import EquilibriumModule
from ep_lightning.systems.initialized import InitializedEP, InitializerDistillation

__all__ = ["EPSystem", "EnergySystem", "EquilibriumModule", "InitializedEP", "InitializerDistillation"]
