"""The plumbing shared by layered nets (models/layered.py) and the ``readout_loss`` default of the model contract."""

from __future__ import annotations

import pytest
import torch

from ep_lightning.models import EnergyBasedNet, FeedforwardInitializer, PrototypicalNet
from ep_lightning.models.layered import LayeredNet


@pytest.mark.parametrize("cls", [PrototypicalNet, EnergyBasedNet])
def test_layered_nets_share_synapses_zero_state_and_groups(cls: type) -> None:
    net = cls([7, 6, 5, 3]).double()
    assert isinstance(net, LayeredNet) and net.num_classes == 3
    assert [(s.in_features, s.out_features) for s in net.synapses] == [(7, 6), (6, 5), (5, 3)]
    state = net.init_state(torch.zeros(4, 7))
    assert [tuple(s.shape) for s in state] == [(4, 6), (4, 5), (4, 3)]
    assert all(s.dtype == torch.float64 and not s.any() for s in state)
    assert net.init_state_shapes() == [(6,), (5,), (3,)]
    assert [[p.shape for p in g] for g in net.parameter_groups()] == [
        [torch.Size([6, 7]), torch.Size([6])],
        [torch.Size([5, 6]), torch.Size([5])],
        [torch.Size([3, 5]), torch.Size([3])],
    ]


def test_ce_readout_keeps_the_last_synapse_out_of_the_state() -> None:
    net = PrototypicalNet([7, 6, 5, 3], readout="ce")
    assert net.n_dynamic == 2 and net.init_state_shapes() == [(6,), (5,)]
    assert len(net.parameter_groups()) == 3  # the read-out keeps its own learning rate


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: PrototypicalNet([784]), "layers=[784]"),
        (lambda: EnergyBasedNet([784, 0, 10]), "layers=[784, 0, 10]"),
        (lambda: FeedforwardInitializer([784]), "initializer.layers=[784]"),
    ],
)
def test_bad_layers_name_the_field(build, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_readout_loss_is_none_without_a_readout_and_a_loss_with_one() -> None:
    x = torch.rand(3, 7)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 3).float()
    for net in (PrototypicalNet([7, 5, 3]), EnergyBasedNet([7, 5, 3])):
        assert net.readout_loss(net.init_state(x), y) is None
    ce = PrototypicalNet([7, 5, 3], readout="ce")
    loss = ce.readout_loss(ce.init_state(x), y)
    assert loss is not None and loss.dim() == 0 and loss > 0
