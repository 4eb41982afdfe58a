"""LightningModules: how a network learns."""

from ep_lightning.systems.equilibrium import EquilibriumModule

__all__ = ["EquilibriumModule"]
