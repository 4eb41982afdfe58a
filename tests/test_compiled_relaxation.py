"""``compile_relaxation``: the compiled relaxation phases give the eager training step's weights; bad combinations and
a compiler failure are reported with the option to change."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ep_lightning.config_checks import ConfigError
from ep_lightning.models import EnergyBasedNet, PrototypicalNet
from ep_lightning.systems import EquilibriumModule

MODELS = {
    "p2h": lambda: PrototypicalNet([6, 5, 4, 3]),
    "eb1h": lambda: EnergyBasedNet([6, 5, 3]),
}


def train_two_steps(model: torch.nn.Module, compile_relaxation: bool, nudging: str = "one_sided") -> dict:
    torch.manual_seed(1)
    x, labels = torch.rand(8, 6), torch.arange(8) % 3
    module = EquilibriumModule(
        model,
        T=6,
        K=3,
        beta=0.3,
        lrs=[0.1] * len(model.parameter_groups()),
        nudging=nudging,
        compile_relaxation=compile_relaxation,
    )
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(TensorDataset(x, labels), batch_size=4))
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("nudging", ["one_sided", "symmetric"])
def test_compiled_relaxation_trains_to_the_eager_weights(kind: str, nudging: str) -> None:
    """Two SGD steps with the compiled relaxation equal the eager ones. Tolerance: the compiler may fuse and reorder
    float32 element-wise work (round-off ~1e-7 per operation); over 9 steps and 2 updates of lr 0.1 that stays
    below 1e-5, while a wrong phase (β, K, missing nudge) changes weights by ≥ 1e-3."""
    torch.manual_seed(0)
    init = MODELS[kind]().state_dict()
    weights = {}
    for compiled in (False, True):
        model = MODELS[kind]()
        model.load_state_dict(init)
        weights[compiled] = train_two_steps(model, compiled, nudging)
    moved = max(float((weights[False][k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3, "the eager run did not train: the comparison would be empty"
    for key in init:
        torch.testing.assert_close(weights[True][key], weights[False][key], rtol=1e-5, atol=1e-5)


def test_compile_relaxation_is_refused_with_bptt_and_with_free_tolerance() -> None:
    with pytest.raises(ValueError, match="compile_relaxation=true applies to EP"):
        EquilibriumModule(PrototypicalNet([6, 5, 3]), algorithm="bptt", compile_relaxation=True)
    with pytest.raises(ValueError, match="free_tolerance=0.001"):
        EquilibriumModule(PrototypicalNet([6, 5, 3]), free_tolerance=1e-3, compile_relaxation=True)


def test_a_compiler_failure_names_the_option_to_turn_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a working C++ compiler, the first step raises a ConfigError saying to set compile_relaxation=false."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/c++"))
    torch._dynamo.reset()
    try:
        with pytest.raises(ConfigError, match="set model.compile_relaxation=false"):
            train_two_steps(PrototypicalNet([6, 5, 3]), compile_relaxation=True)
    finally:
        torch._dynamo.reset()
