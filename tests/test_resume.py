"""Resume and reproducibility: a run killed mid-epoch (SIGKILL, in a subprocess) and resumed with ``--ckpt_path last``
ends with bit-for-bit the weights, optimizer state and scheduler state of an uninterrupted run, having seen the
same batches in the same order (and, for Initialized EP, the same random β signs); ``seed_everything`` plus the
saved config reproduce a run exactly on CPU.

Runs: 2 epochs × 10 batches of 20 MNIST images, 784-16-10 networks, T ≤ 5, through the real CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ep_lightning.cli import cli_main
from ep_lightning.data import EpochShuffleSampler, ResumableDataLoader, TensorPairDataset, keep_batch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

EP_SYSTEM = {
    "class_path": "ep_lightning.systems.EquilibriumModule",
    "init_args": {
        "algorithm": "ep",
        "T": 5,
        "K": 2,
        "beta": 0.5,
        "lrs": [0.05, 0.02],
        # momentum and a scheduler, so that optimizer and scheduler state must be restored too
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0, "momentum": 0.9}},
        "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
        "net": {"class_path": "ep_lightning.models.PrototypicalNet", "init_args": {"layers": [784, 16, 10]}},
    },
}
IEP_SYSTEM = {
    "class_path": "ep_lightning.systems.InitializedEP",
    "init_args": {
        "T": 4,
        "K": 2,
        "beta": 0.5,
        "nudging": "random_sign",
        "lam": 0.1,
        "lrs": [0.1, 0.05],
        "net": {
            "class_path": "ep_lightning.models.EnergyBasedNet",
            "init_args": {"layers": [784, 16, 10], "activation": "hard_sigmoid", "eps": 0.5, "cost_scale": 1.0},
        },
        "initializer": {
            "class_path": "ep_lightning.models.FeedforwardInitializer",
            "init_args": {"layers": [784, 16, 10]},
        },
    },
}
SYSTEMS = {"ep": EP_SYSTEM, "iep": IEP_SYSTEM}


def write_config(path: Path, system: dict, seed: int = 3) -> Path:
    config = {
        "seed_everything": seed,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": system,
        "data": {
            "class_path": "ep_lightning.data.MNISTDataModule",
            "init_args": {"data_dir": str(ROOT / "data"), "batch_size": 20, "train_subset": 200, "test_subset": 20},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_args(config: Path, root: Path, every_n: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        "--test_after_fit",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps",
        str(every_n),
        "--trainer.callbacks.save_last",
        "true",
        "--trainer.callbacks+=resume_helpers.SaveFinalWeights",
        "--trainer.callbacks.path",
        str(root / "final.pt"),
        "--trainer.callbacks+=resume_helpers.RecordBatches",
        "--trainer.callbacks.path",
        str(root / "batches.txt"),
        *extra,
    ]


def in_process(args: list[str]) -> None:
    sys.path.insert(0, str(TESTS))
    try:
        cli_main(args)
    finally:
        sys.path.remove(str(TESTS))


def load_final(root: Path) -> dict:
    return torch.load(root / "final.pt", map_location="cpu", weights_only=False)


def assert_same_run(a: dict, b: dict) -> None:
    """Bit-for-bit: every weight, every optimizer buffer and learning rate, every scheduler field."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"weight {k} differs"
    assert len(a["optimizers"]) == len(b["optimizers"])
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
        assert oa["state"].keys() == ob["state"].keys()
        for i in oa["state"]:
            for name, value in oa["state"][i].items():
                other = ob["state"][i][name]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, f"optimizer {i} {name}"
    assert a["schedulers"] == b["schedulers"]


def batches(root: Path) -> list[str]:
    return (root / "batches.txt").read_text().splitlines()


# --- the sampler ------------------------------------------------------------------------------------------------
def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    s = EpochShuffleSampler(50, seed=7)
    first = list(s)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(s) == first, "same epoch, same order"
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == list(range(50)) and second != first
    assert list(EpochShuffleSampler(50, seed=8)) != first


def test_loader_state_resumes_the_same_epoch_mid_way() -> None:
    data = TensorPairDataset(torch.zeros(50, 1), torch.arange(50))
    done = {"n": 0}
    loader = ResumableDataLoader(
        data, batch_size=4, sampler=EpochShuffleSampler(50, 1), collate_fn=keep_batch, batches_done=lambda: done["n"]
    )
    loader.sampler.set_epoch(3)
    full = [b[1].tolist() for b in loader]
    done["n"] = 5  # the trainer finished 5 batches; the loader may have prefetched more
    state = loader.state_dict()
    assert state == {"seed": 1, "epoch": 3, "samples_done": 20}
    fresh = ResumableDataLoader(data, batch_size=4, sampler=EpochShuffleSampler(50, 999), collate_fn=keep_batch)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(3)  # Lightning sets the same epoch again on resume: the position is kept
    assert [b[1].tolist() for b in fresh] == full[5:]
    assert [b[1].tolist() for b in fresh] == full, "the next pass over the same epoch starts from the beginning"
    fresh.sampler.set_epoch(4)
    assert [b[1].tolist() for b in fresh] != full


# --- kill and resume --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted 2-epoch run per system."""
    roots = {}
    for name, system in SYSTEMS.items():
        root = tmp_path_factory.mktemp(f"reference_{name}")
        in_process(run_args(write_config(root / "input.yaml", system), root, every_n=1000))
        roots[name] = root
    return roots


@pytest.mark.parametrize(
    "system, kill_at, every_n, last_step",
    [
        ("ep", 14, 3, 12),  # killed in epoch 1, resumed from the step-12 checkpoint (epoch 1, batch 2 of 10)
        ("ep", 12, 5, 10),  # resumed from the checkpoint of the epoch's last batch (before the epoch-end hooks)
        ("iep", 7, 3, 6),  # Initialized EP: also the random β-sign stream must continue where it stopped
    ],
)
def test_killed_run_resumes_bit_for_bit(
    system: str, kill_at: int, every_n: int, last_step: int, reference: dict[str, Path], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "input.yaml", SYSTEMS[system])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    killed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *run_args(config, tmp_path, every_n),
            "--trainer.callbacks+=resume_helpers.HardKill",
            "--trainer.callbacks.at_step",
            str(kill_at),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -9, f"the run must die by SIGKILL:\n{killed.stderr[-3000:]}"
    assert not (tmp_path / "final.pt").exists()
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == last_step

    (tmp_path / "batches.txt").unlink()
    in_process(run_args(config, tmp_path, every_n, "--ckpt_path", "last"))

    assert_same_run(load_final(reference[system]), load_final(tmp_path))
    expected = [line for line in batches(reference[system]) if int(line.split()[0]) >= last_step]
    assert batches(tmp_path) == expected, "the resumed run must see exactly the rest of the batches, in order"


def test_resume_without_the_loader_state_is_not_exact(reference: dict[str, Path], tmp_path: Path) -> None:
    """Control: drop the data loader's saved position from a mid-epoch checkpoint and resume — the run sees other
    batches and ends elsewhere. This is what the loader state buys (a plain RandomSampler behaves like this)."""
    config = write_config(tmp_path / "input.yaml", EP_SYSTEM)
    first = tmp_path / "first"
    in_process(run_args(config, first, 3, "--trainer.max_steps", "12"))
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12
    assert ckpt["loops"]["fit_loop"]["state_dict"].pop("combined_loader")
    torch.save(ckpt, tmp_path / "no_loader_state.ckpt")
    second = tmp_path / "second"
    in_process(run_args(config, second, 3, "--ckpt_path", str(tmp_path / "no_loader_state.ckpt")))
    a, b = load_final(reference["ep"]), load_final(second)
    assert not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


# --- reproducibility --------------------------------------------------------------------------------------------
def test_seed_and_saved_config_reproduce_the_run(reference: dict[str, Path], tmp_path: Path) -> None:
    """The config LightningCLI saved next to the reference run, replayed, gives the same weights bit for bit;
    changing only the seed changes them (so the comparison can fail)."""
    saved = yaml.safe_load((reference["ep"] / "config.yaml").read_text())  # written by LightningCLI
    assert saved["seed_everything"] == 3
    replay = tmp_path / "replay"
    saved["trainer"]["default_root_dir"] = str(replay)
    for callback in saved["trainer"]["callbacks"]:  # only where the outputs go changes
        if "path" in callback.get("init_args", {}):
            callback["init_args"]["path"] = str(replay / Path(callback["init_args"]["path"]).name)
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump(saved))
    in_process(["fit", "--config", str(tmp_path / "replay.yaml")])
    assert_same_run(load_final(reference["ep"]), load_final(replay))
    assert batches(replay) == batches(reference["ep"])

    other = tmp_path / "other_seed"
    in_process(run_args(write_config(tmp_path / "seed4.yaml", EP_SYSTEM, seed=4), other, every_n=1000))
    a, b = load_final(reference["ep"]), load_final(other)
    assert not any(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert batches(other) != batches(reference["ep"]), "the data order follows the run seed"
