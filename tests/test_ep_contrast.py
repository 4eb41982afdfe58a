"""The fast bilinear EP contrast equals the generic Σ[Φ(s*) − Φ(s^β)] from ``phi``, in value and θ-gradient."""

from __future__ import annotations

import pytest
import torch

from ep_lightning.models import EnergyBasedNet, EnergyModel, PrototypicalNet
from ep_lightning.relaxation import relax


@pytest.mark.parametrize(
    "model",
    [
        PrototypicalNet([12, 8, 5]),
        PrototypicalNet([12, 8, 7, 5], activation="hard_sigmoid"),
        EnergyBasedNet([12, 8, 5]),
        EnergyBasedNet([12, 8, 7, 5], activation="hard_sigmoid", eps=0.5, cost_scale=1.0),
    ],
    ids=["p1h", "p2h_hard", "eb1h", "eb2h_iep"],
)
def test_fast_contrast_matches_phi_difference(model: EnergyModel) -> None:
    model = model.double()
    x = torch.rand(6, 12, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (6,)), 5).double()
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), 15)
        nudged = relax(model, drive, free, 4, 0.5, y)
    params = list(model.parameters())
    fast = model.ep_contrast(x, free, nudged)
    generic = EnergyModel.ep_contrast(model, x, free, nudged)  # the default: phi-based, autograd through Φ
    # Same float64 sums in a different order: 1e-10 relative.
    torch.testing.assert_close(fast, generic, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(generic, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", [PrototypicalNet([12, 8, 7, 5]), EnergyBasedNet([12, 8, 7, 5])], ids=["p2h", "eb2h"])
@pytest.mark.parametrize("outer", [1.0, 3.0], ids=["grad_1", "grad_3"])
def test_scaled_contrast_gradient(model: EnergyModel, outer: float) -> None:
    """ep_contrast(scale=s) has value and gradient s × the unscaled ones, also when the incoming gradient is not 1
    (the backward that multiplies) and when it is 1 (the backward that hands its coefficients over)."""
    model = model.double()
    x = torch.rand(6, 12, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 5, (6,)), 5).double()
    with torch.no_grad():
        drive = model.drive(x)
        free = relax(model, drive, model.init_state(x), 15)
        nudged = relax(model, drive, free, 4, 0.5, y)
    params = list(model.parameters())
    scale = 1.0 / 3.0  # not a power of 2: the scale's rounding differs by a few ulps, hence 1e-12
    generic = EnergyModel.ep_contrast(model, x, free, nudged)
    expected = torch.autograd.grad(outer * scale * generic, params)
    scaled = model.ep_contrast(x, free, nudged, scale=scale)
    torch.testing.assert_close(scaled, scale * generic, rtol=1e-12, atol=1e-14)
    for p in params:
        p.grad = None
    (outer * scaled).backward() if outer != 1.0 else scaled.backward()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError):  # the coefficients were handed over: a second backward must not reuse them
        scaled.backward()
