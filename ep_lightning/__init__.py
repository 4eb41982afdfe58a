"""ep_lightning: Equilibrium Propagation, BPTT and Initialized EP for convergent RNNs, on PyTorch Lightning."""

__version__ = "0.1.0"
