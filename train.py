"""Train, evaluate or inspect a convergent network: ``python train.py fit --config configs/mnist/p1h_ep.yaml``."""

from ep_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
