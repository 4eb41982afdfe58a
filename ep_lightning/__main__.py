"""``python -m ep_lightning fit --config configs/mnist/p1h_ep.yaml`` (the same as ``train.py`` and ``ep-lightning``)."""

from ep_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
