"""End to end through the real entry point (LightningCLI): fit → test accuracy, checkpoint → test, saved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ep_lightning.cli import cli_main


def _fit_args(config: Path, root: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--data.train_subset",
        "2000",
        "--data.test_subset",
        "1000",
    ]


@pytest.mark.parametrize("algorithm", ["ep", "bptt"])
def test_short_training_run_learns_far_above_chance(algorithm: str, repo_root: Path, tmp_path: Path) -> None:
    """One epoch on 2,000 MNIST images (100 SGD steps of the paper's P-1h settings) then test on 1,000 images.

    Chance is 10 % (the most frequent test class is 11.4 %). Measured: EP ≈ 74 %, BPTT ≈ 70 %; 50 % leaves room for
    seed and platform differences while failing for any run that does not learn (a sign error in the update gives
    ≤ 20 %).
    """
    cli = cli_main(_fit_args(repo_root / f"configs/mnist/p1h_{algorithm}.yaml", tmp_path))
    accuracy = cli.trainer.callback_metrics["test/acc"].item()
    assert accuracy > 0.5, f"{algorithm}: test accuracy {accuracy:.3f} after one short epoch"
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file(), "LightningCLI must save the run's config in the run folder"
    assert list(log_dir.glob("events.out.tfevents.*")), "TensorBoard is the default logger"
    checkpoints = list(log_dir.glob("checkpoints/*.ckpt"))
    assert checkpoints, "a checkpoint is written"

    # `test --ckpt_path` rebuilds the module from the config and loads the weights: same accuracy.
    test_cli = cli_main(
        [
            "test",
            "--config",
            str(log_dir / "config.yaml"),
            "--ckpt_path",
            str(log_dir / "checkpoints" / "last.ckpt"),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "test_run"),
        ]
    )
    assert test_cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(accuracy, abs=1e-6)


def test_print_config_runs_as_a_subprocess(repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/mnist/p1h_ep.yaml", "--print_config"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ep_lightning.models.PrototypicalNet" in result.stdout
    assert "lrs:" in result.stdout


def test_threads_option_sets_torch_threads(repo_root: Path) -> None:
    from ep_lightning.cli import configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads=0"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("--model.init_args.model.init_args.layers", "'net'"),
        ("--model.model.init_args.layers", "'net'"),
        ("--model.init_args.T_minus", "'T'"),
        ("--model.init_args.random_sign", "'nudging'"),
    ],
)
def test_renamed_key_is_one_line_naming_the_new_key(old: str, new: str, tmp_path: Path) -> None:
    """A key renamed by the redesign (the inner network `model` → `net`, IEP's T_minus → T, …) fails at once with one
    line naming the old key and the new one, before any run folder exists."""
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/mnist/p1h_ep.yaml", old, "1",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
        cwd=root, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {old} uses a renamed key") and new in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_config_file_with_a_renamed_key_names_the_file(tmp_path: Path) -> None:
    from ep_lightning.config_checks import config_file_errors

    old = tmp_path / "old.yaml"
    old.write_text("model:\n  class_path: ep_lightning.systems.EquilibriumModule\n  init_args:\n    model: {}\n")
    message = config_file_errors(["fit", "--config", str(old)], [])
    assert message is not None and str(old) in message and "'model' is now 'net'" in message
    shipped = Path(__file__).parents[1] / "configs" / "mnist" / "p1h_ep.yaml"
    assert config_file_errors(["fit", "--config", str(shipped)], []) is None


def test_model_short_name_and_its_help(repo_root: Path) -> None:
    """The CLI's model base class is the package's EnergySystem: ``--model EquilibriumModule`` and
    ``--model.help EquilibriumModule`` resolve the short name; the help text has no literal ``%%``."""
    args = [sys.executable, "train.py", "fit"]
    helped = subprocess.run(
        [*args, "--model.help", "EquilibriumModule"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--model.beta" in helped.stdout and "--model.net" in helped.stdout
    printed = subprocess.run(
        [*args, "--model", "EquilibriumModule", "--model.net", "PrototypicalNet", "--model.net.layers", "[784, 16, 10]",
         "--model.lrs", "[0.1, 0.1]", "--print_config"],
        cwd=repo_root, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "class_path: ep_lightning.systems.EquilibriumModule" in printed.stdout
    assert "class_path: ep_lightning.models.PrototypicalNet" in printed.stdout
    usage = subprocess.run([*args, "--help"], cwd=repo_root, capture_output=True, text=True, timeout=120, check=False)
    assert "~25 % faster" in " ".join(usage.stdout.split()) and "%%" not in usage.stdout


UNKNOWN_KEYS = [
    (["--model.init_args.net.init_args.layerz", "[1]"], "model.init_args.net.init_args.layerz on the command line",
     "model.init_args.net.init_args.layers"),
    (["--data.batchsize", "3"], "data.init_args.batchsize on the command line", "data.init_args.batch_size"),
    (["--trainer.max_epoks", "3"], "unknown option --trainer.max_epoks", "--trainer.max_epochs"),
    (["--trainer.logger.init_args.savedir", "x"], "trainer.logger.init_args.savedir",
     "trainer.logger.init_args.save_dir"),
]  # fmt: skip


@pytest.mark.parametrize("args, named, closest", UNKNOWN_KEYS, ids=[a[0] for a, _, _ in UNKNOWN_KEYS])
def test_unknown_key_is_one_line_with_the_closest_valid_keys(
    args: list[str], named: str, closest: str, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(repo_root / "configs/mnist/p1h_ep.yaml"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert named in lines[0] and f"closest valid {'options' if 'option' in named else 'keys'}: {closest}" in lines[0]


def test_unknown_key_in_a_nested_config_file(tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_epoks: 3\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(repo_root / "configs/mnist/p1h_ep.yaml"), "--config", str(config)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: unknown key trainer.max_epoks in config file {config}; closest valid keys: ")
    assert "trainer.max_epochs" in line
