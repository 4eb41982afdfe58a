"""Convergent networks: plain ``nn.Module``s holding Φ (or E) and their one-step dynamics."""

from ep_lightning.models.base import EnergyModel, State
from ep_lightning.models.conv import ConvPrototypicalNet
from ep_lightning.models.energy import EnergyBasedNet, EnergyDrive
from ep_lightning.models.prototypical import PrototypicalNet

__all__ = ["EnergyModel", "State", "PrototypicalNet", "EnergyBasedNet", "EnergyDrive", "ConvPrototypicalNet"]

from ep_lightning.models.initializer import FeedforwardInitializer  # noqa: E402  (Initialized EP's f_φ)

__all__ += ["FeedforwardInitializer"]
