"""Convergent networks: plain ``nn.Module``s holding Φ (or E) and their one-step dynamics."""

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.conv import ConvPrototypicalNet
from ep_lightning.models.energy import EnergyBasedNet, EnergyDrive
from ep_lightning.models.prototypical import PrototypicalNet

__all__ = ["ConvPrototypicalNet", "EnergyBasedNet", "EnergyDrive", "EnergyModel", "PrototypicalNet", "State"]

from ep_lightning.models.initializer import FeedforwardInitializer

__all__ += ["FeedforwardInitializer"]
