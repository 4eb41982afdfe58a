"""LightningModules: how a network learns."""

from ep_lightning.systems.equilibrium import EquilibriumModule

__all__ = ["EquilibriumModule"]

from ep_lightning.systems.initialized import InitializedEP, InitializerDistillation

__all__ += ["InitializedEP", "InitializerDistillation"]
