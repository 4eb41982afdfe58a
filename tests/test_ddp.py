"""DDP is correct: 2 processes on B samples each train exactly like 1 process on the 2B samples (CPU, gloo).

Why this needs proof: with manual optimization, only gradients produced by ``self.manual_backward`` are all-reduced
(Lightning #9237, #18086); a ``p.grad`` written by hand trains each replica on its own shard, silently.

The claim. The EP update (and the BPTT gradient, and the initializer's contrast-loss gradient) is a batch *mean*
of per-sample terms, and every sample relaxes independently of the others. DDP averages the ranks' gradients, so
rank r's mean over its B samples, averaged over 2 ranks, is the mean over the 2B samples: after every SGD step the
weights of a 2-process run must equal those of a 1-process run whose batches are the union of the ranks' batches.

How. Lightning always gives the training loader a ``DistributedSampler(shuffle=True)`` under DDP. Rather than
re-deriving its permutation, each rank records the sample ids it trained on (``ddp_helpers.RecordRun``); the
single-process reference then trains on exactly those unions, in the same order. Everything runs in float64
(``precision='64-true'``), so the comparison can be tight.

Process start. ``ddp`` relaunches ``sys.argv`` and cannot run inside pytest. ``ddp_spawn`` starts fresh
interpreters (~5 s per run on 2 idle cores, several times that under load), so it runs once (EP); ``ddp_fork``
(the same ``DDPStrategy``, reducer and ``manual_backward`` path, only the start method differs, < 1 s per run)
covers the model × algorithm matrix, and one ``ddp`` run of ``train.py`` as a subprocess proves the CLI config.

Negative controls show that the checks can fail: a module writing ``p.grad`` by hand (ranks diverge) and an
Initialized-EP module whose β sign depends on the rank (ranks agree, but no longer equal the full-batch run).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import ddp_helpers as H
import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from ep_lightning.systems import EquilibriumModule

pytestmark = pytest.mark.ddp

WORLD, BATCH, STEPS = 2, 4, 3
N = WORLD * BATCH * STEPS  # one epoch of STEPS global batches of WORLD·BATCH samples
#: Tolerance of "DDP == single process" (float64, weights of size 0.1–1). The two runs differ only in rounding:
#: per-rank means averaged by the all-reduce against one mean over 2B samples, and BLAS blocking for batches of
#: B against 2B rows. Each step's update then differs by a few ulps (measured ≤ 1.8e-15 over all cases after 3
#: steps; contracting dynamics do not amplify it); 1e-10 leaves 5 orders of margin and is 9 orders below what the
#: negative controls produce (0.2–0.3: one rank's samples missing from the update, or the wrong β sign).
ATOL = 1e-10
#: A parameter counts as trained if it moved by more than this (updates are lr·|Δθ| ≈ 1e-3 to 1e-1 here).
MOVED = 1e-6
#: gloo gives up after this long instead of its 30 min default: a hang (e.g. a parameter that never receives a
#: gradient, which DDP waits for) fails the test quickly.
TIMEOUT = timedelta(seconds=60)

IEP_AVAILABLE = H.InitializedEP is not None


def make_system(algorithm: str, kind: str, cls: type | None = None) -> L.LightningModule:
    """A tiny system, seeded so that every call builds the same weights."""
    torch.manual_seed(0)
    model = H.tiny_model(kind)
    groups = len(model.parameter_groups())
    if algorithm == "iep":
        from ep_lightning.models.initializer import FeedforwardInitializer

        cls = cls or H.InitializedEP
        return cls(
            net=model,
            initializer=FeedforwardInitializer(model.layers),
            T=6,
            K=3,
            beta=0.5,
            nudging="random_sign",
            lam=0.1,
            lrs=[0.5] * groups,
            energy_init="keep",
            sign_seed=0,
        )
    cls = cls or EquilibriumModule
    return cls(model, algorithm=algorithm, T=8, K=4, beta=0.2, lrs=[0.5] * groups)


def fit(module: L.LightningModule, strategy: object, devices: int, out_dir: Path, loader: DataLoader) -> None:
    """One epoch in float64 without logger/checkpoints; ``RecordRun`` writes each rank's record into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        precision="64-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[H.RecordRun(out_dir)],
    )
    trainer.fit(module, train_dataloaders=loader)


def run_ddp_and_reference(
    module: L.LightningModule, start_method: str, tmp_path: Path
) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    """(record of each DDP rank, record of the 1-process reference on the same global batches, initial weights)."""
    reference = copy.deepcopy(module)  # before fit: ddp_spawn copies rank 0's final weights back into `module`
    initial = {k: p.detach().double().clone() for k, p in module.named_parameters()}
    dataset = H.tiny_dataset(N)
    strategy = DDPStrategy(start_method=start_method, timeout=TIMEOUT)
    fit(module, strategy, WORLD, tmp_path / "ddp", DataLoader(dataset, batch_size=BATCH))
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(WORLD)]
    global_batches = [[i for b in batches for i in b] for batches in zip(*(r["sample_ids"] for r in ranks))]
    fit(reference, "auto", 1, tmp_path / "ref", DataLoader(dataset, batch_sampler=global_batches))
    return ranks, torch.load(tmp_path / "ref" / "rank0.pt"), initial


def check_shards(ranks: list[dict], reference: dict) -> None:
    """Each rank trained on its own samples (disjoint shards, all N samples seen once), batch by batch the
    reference saw their union, and the run really had WORLD processes."""
    assert [r["world_size"] for r in ranks] == [WORLD] * WORLD
    assert all(len(r["sample_ids"]) == STEPS and all(len(b) == BATCH for b in r["sample_ids"]) for r in ranks)
    seen = [i for r in ranks for b in r["sample_ids"] for i in b]
    assert sorted(seen) == list(range(N)), "ranks must see disjoint shards covering the dataset"
    for step, batch in enumerate(reference["sample_ids"]):
        assert batch == sorted(i for r in ranks for i in r["sample_ids"][step])


def assert_ddp_equals_reference(ranks: list[dict], reference: dict, initial: dict[str, torch.Tensor]) -> None:
    rank0 = ranks[0]["weights"]
    assert rank0.keys() == reference["weights"].keys() == initial.keys()
    for name, ref in reference["weights"].items():
        for r in range(1, WORLD):
            # Bitwise: every rank applies the same all-reduced gradient to the same broadcast initial weights.
            assert torch.equal(ranks[r]["weights"][name], rank0[name]), f"{name}: rank {r} differs from rank 0"
        assert (ref - initial[name]).abs().max() > MOVED, f"{name} was not trained: left out of the update?"
        torch.testing.assert_close(
            rank0[name], ref, rtol=0.0, atol=ATOL, msg=lambda m, name=name: f"{name}: DDP ≠ 1 process: {m}"
        )


IEP = pytest.mark.skipif(not IEP_AVAILABLE, reason="ep_lightning.systems.initialized missing")
CASES = [
    # Fresh interpreters (ddp_spawn): the most faithful in-process launch, ~5 s per run on 2 idle cores.
    pytest.param("spawn", "ep", "p", id="spawn-ep-p"),
    pytest.param("spawn", "iep", "eb", id="spawn-iep-eb", marks=IEP),
    # ddp_fork: the same DDPStrategy, reducer and manual_backward path, only the start method differs (< 1 s).
    pytest.param("fork", "bptt", "p", id="fork-bptt-p"),
    pytest.param("fork", "iep", "eb", id="fork-iep-eb", marks=IEP),
    pytest.param("fork", "ep", "eb", id="fork-ep-eb"),
    pytest.param("fork", "bptt", "eb", id="fork-bptt-eb"),
    pytest.param("fork", "ep", "conv", id="fork-ep-conv"),
    pytest.param("fork", "bptt", "conv", id="fork-bptt-conv"),
]


@pytest.mark.parametrize(("start_method", "algorithm", "kind"), CASES)
def test_two_processes_equal_one_process_on_the_full_batch(
    start_method: str, algorithm: str, kind: str, tmp_path: Path
) -> None:
    module = make_system(algorithm, kind)
    if algorithm == "iep":
        # The sign sequence of these steps holds both signs, so a rank drawing its own sign could not go unnoticed.
        probe = copy.deepcopy(module)
        signs = {probe.draw_nudging_pair()[1] for _ in range(STEPS)}
        assert signs == {0.5, -0.5}, f"seed gives signs {signs}: pick a seed with both signs in {STEPS} steps"
    ranks, reference, initial = run_ddp_and_reference(module, start_method, tmp_path)
    check_shards(ranks, reference)
    assert_ddp_equals_reference(ranks, reference, initial)


def test_negative_control_hand_written_grad_makes_ranks_diverge(tmp_path: Path) -> None:
    """A module that assigns ``p.grad`` by hand (``ddp_helpers.HandWrittenGradEP``) runs without any error, but the
    ranks end with different weights and neither equals the reference: the checks above can fail."""
    module = make_system("ep", "p", cls=H.HandWrittenGradEP)
    ranks, reference, _ = run_ddp_and_reference(module, "fork", tmp_path)
    check_shards(ranks, reference)
    for name, ref in reference["weights"].items():
        w0, w1 = ranks[0]["weights"][name], ranks[1]["weights"][name]
        assert (w0 - w1).abs().max() > 1e-3, f"{name}: ranks agree although p.grad bypassed the all-reduce"
        assert (w0 - ref).abs().max() > 1e-3, f"{name}: rank 0 matches the full-batch run without any all-reduce"


@pytest.mark.skipif(not IEP_AVAILABLE, reason="ep_lightning.systems.initialized missing")
def test_negative_control_rank_dependent_beta_sign_is_detected(tmp_path: Path) -> None:
    """Initialized EP with a β sign that differs between ranks: DDP keeps the ranks identical (it averages the
    gradients), but the run no longer equals one process on the full batch; the IEP case above would fail."""
    module = make_system("iep", "eb", cls=H.RankDependentSignIEP)
    ranks, reference, _ = run_ddp_and_reference(module, "fork", tmp_path)
    for name in reference["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
    worst = max((ranks[0]["weights"][k] - ref).abs().max().item() for k, ref in reference["weights"].items())
    assert worst > 1e-6, f"a rank-dependent β sign went unnoticed (largest difference {worst:.1e})"


def test_train_py_with_ddp_config_runs_two_processes(repo_root: Path, tmp_path: Path) -> None:
    """``train.py fit --config <model> --config configs/trainer/ddp.yaml`` (strategy ``ddp``: train.py relaunched
    per rank) on 2 CPU processes: it trains, tests, and rank 0 alone writes the logs and the checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/mnist/p1h_ep.yaml",
        "--config",
        "configs/trainer/ddp.yaml",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--model.init_args.T",
        "5",
        "--model.init_args.K",
        "2",
        "--data.train_subset",
        "200",
        "--data.test_subset",
        "100",
    ]
    process = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    assert "Starting with 2 processes" in output
    assert "test/acc" in output
    runs = list((tmp_path / "p1h_ep").iterdir())
    assert len(runs) == 1, f"one run folder expected, got {runs}"
    # events.out.tfevents.<time>.<host>.<pid>.<n>: fit and the final test each open one file, both from the
    # launched process, which is rank 0 under `ddp` (it relaunches itself for ranks 1…N−1).
    events = list(runs[0].glob("events.out.tfevents.*"))
    assert events, "TensorBoard is the default logger"
    writers = {int(e.name.split(".")[-2]) for e in events}
    assert writers == {process.pid}, f"TensorBoard files written by processes {writers}, rank 0 is {process.pid}"
    assert (runs[0] / "config.yaml").is_file()
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file(), "rank 0 writes the checkpoint"


MODEL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "mnist").glob("*.yaml"))
TRAINER_CONFIGS = [("ddp.yaml", "popen", MODEL_CONFIGS), ("ddp_spawn.yaml", "spawn", MODEL_CONFIGS[:1])]


@pytest.mark.parametrize(
    ("trainer_config", "start_method", "model_config"),
    [(t, s, m) for t, s, models in TRAINER_CONFIGS for m in models],
    ids=lambda v: v.stem if isinstance(v, Path) else str(v),
)
def test_trainer_config_composes_with_every_model_config(
    trainer_config: str, start_method: str, model_config: Path, repo_root: Path
) -> None:
    """``--config <model> --config configs/trainer/<ddp>.yaml`` builds a 2-process DDPStrategy with
    ``find_unused_parameters`` off (every parameter must receive its gradient through manual_backward)."""
    from ep_lightning.cli import cli_main

    cli = cli_main(
        [
            "--config",
            str(model_config),
            "--config",
            str(repo_root / "configs" / "trainer" / trainer_config),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DDPStrategy) and cli.trainer.world_size == 2
    assert strategy._start_method == start_method
    assert not strategy._ddp_kwargs.get("find_unused_parameters", False)
    assert cli.trainer._accelerator_connector.use_distributed_sampler
