"""The CIFAR training augmentation: flip + edge-padded crop equals the per-image definition, its draws have the
right distribution and are a function of (seed, epoch, sample), training batches get it on the device through the
DataModule hook (evaluation batches never), and a run resumed mid-epoch draws exactly what the uninterrupted run
drew."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cifar_files import write_cifar
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from ep_lightning.data import CIFAR10DataModule, RandomFlipCrop, flip_crop


def reference_flip_crop(image: Tensor, flip: bool, dy: int, dx: int, padding: int) -> Tensor:
    """torchvision's RandomHorizontalFlip then RandomCrop(padding, padding_mode='edge') for one image (C, H, W):
    flip, pad by replicating the edge pixels ('edge' = torch's 'replicate'), take the H × W window at (dy, dx)."""
    h, w = image.shape[-2:]
    x = torch.flip(image, dims=[-1]) if flip else image
    padded = F.pad(x[None], (padding, padding, padding, padding), mode="replicate")[0]
    return padded[:, dy : dy + h, dx : dx + w]


def test_flip_crop_equals_the_per_image_definition() -> None:
    """Every offset in [0, 2p]² with and without flip, float64 (pure indexing: exact equality)."""
    padding = 4
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)] * 2)
    flip = torch.arange(len(offsets)) >= len(offsets) // 2
    images = torch.rand(len(offsets), 3, 32, 32, generator=g, dtype=torch.float64)
    out = flip_crop(images, flip, offsets, padding)
    for b in range(len(offsets)):
        expected = reference_flip_crop(images[b], bool(flip[b]), int(offsets[b, 0]), int(offsets[b, 1]), padding)
        assert torch.equal(out[b], expected), (b, offsets[b].tolist(), bool(flip[b]))
    centred = flip_crop(images[:2], torch.zeros(2, dtype=torch.bool), torch.full((2, 2), padding), padding)
    assert torch.equal(centred, images[:2]), "offset (p, p) without flip is the identity"


def test_draws_have_the_augmentation_distribution() -> None:
    """flip ~ Bernoulli(0.5), each offset coordinate uniform on {0, …, 8} (RandomCrop(32, padding=4) on 32 × 32).
    20,000 samples: the flip rate within 4σ = 4·√(0.25/20000) ≈ 0.014 of 0.5, each offset's frequency within
    4·√((1/9)(8/9)/20000) ≈ 0.009 of 1/9 (deterministic for the fixed seed; 4σ makes it a real check)."""
    flip, offsets = RandomFlipCrop(20_000, padding=4).draws(seed=0, epoch=0)
    assert abs(flip.float().mean().item() - 0.5) < 0.014
    assert offsets.min() == 0 and offsets.max() == 8
    for axis in range(2):
        freq = torch.bincount(offsets[:, axis], minlength=9).float() / 20_000
        assert (freq - 1 / 9).abs().max() < 0.009, freq
    assert (offsets[:, 0] != offsets[:, 1]).float().mean() > 0.8, "the two offsets are drawn independently"


def test_draws_are_a_function_of_seed_epoch_and_sample() -> None:
    """Sample 7's augmentation is the same in any batch, at any position; another epoch or seed draws anew."""
    aug = RandomFlipCrop(10)
    images = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = aug(images[[3, 7]], torch.tensor([3, 7]), seed=5, epoch=2)
    b = aug(images[[7, 1, 3]], torch.tensor([7, 1, 3]), seed=5, epoch=2)
    assert torch.equal(a[1], b[0]) and torch.equal(a[0], b[2])
    offsets = aug.draws(5, 2)[1]
    assert torch.equal(RandomFlipCrop(10).draws(5, 2)[1], offsets), "no hidden state: a fresh object draws the same"
    assert not torch.equal(aug.draws(5, 3)[1], offsets) and not torch.equal(aug.draws(6, 2)[1], offsets)


class Recorder(L.LightningModule):
    """A linear classifier on the flattened image that records every batch its steps receive."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3 * 32 * 32, 10)
        self.train_batches: list[tuple[int, int, Tensor, Tensor]] = []
        self.val_images: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch  # augment: true and return_index: false: the hook dropped the index again
        self.train_batches.append((self.current_epoch, batch_idx, x.clone(), y.clone()))
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.val_images.append(batch[0].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
    }
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture
def cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")  # the run seed (seed_everything's variable), without leaking it
    write_cifar(tmp_path / "data", train=8, test=4)
    return tmp_path


def datamodule(root: Path) -> CIFAR10DataModule:
    return CIFAR10DataModule(data_dir=str(root / "data"), verify_checksums=False, batch_size=6, val_size=10)


def test_training_batches_are_augmented_in_the_hook_and_evaluation_batches_never(cifar: Path) -> None:
    torch.manual_seed(0)
    module, dm = Recorder(), datamodule(cifar)
    trainer(cifar, enable_checkpointing=False).fit(module, datamodule=dm)
    clean = dm.train_set.images
    # the training order, independently: randperm seeded with run seed + epoch
    order = {e: torch.randperm(len(clean), generator=torch.Generator().manual_seed(4 + e)) for e in (0, 1)}
    assert len(module.train_batches) == 2 * 5  # 30 training images in batches of 6, 2 epochs
    for epoch, batch_idx, x, y in module.train_batches:
        index = order[epoch][6 * batch_idx : 6 * (batch_idx + 1)]
        flip, offsets = RandomFlipCrop(len(clean)).draws(seed=4, epoch=epoch)
        assert torch.equal(y, dm.train_set.labels[index])
        for k, i in enumerate(index.tolist()):
            expected = reference_flip_crop(clean[i], bool(flip[i]), int(offsets[i, 0]), int(offsets[i, 1]), 4)
            assert torch.equal(x[k], expected), (epoch, batch_idx, k)
        assert not torch.equal(x, clean[index]), "augmented"
    assert torch.equal(torch.cat(module.val_images[:1]), dm.val_set.images), "validation images as they are"


def test_resumed_run_draws_what_the_uninterrupted_run_drew(cifar: Path) -> None:
    """Stopped after step 7 (epoch 1, batch 2 of 5) with a checkpoint, resumed with ckpt_path: the remaining
    training batches — order and augmentation — and the final weights equal the uninterrupted run's, bit for bit."""
    torch.manual_seed(0)
    reference = Recorder()
    trainer(cifar / "ref", enable_checkpointing=False).fit(reference, datamodule=datamodule(cifar))

    torch.manual_seed(0)
    first = Recorder()
    save = ModelCheckpoint(dirpath=str(cifar / "ckpt"), every_n_train_steps=7, save_top_k=-1)
    trainer(cifar / "first", max_steps=7, callbacks=[save]).fit(first, datamodule=datamodule(cifar))
    checkpoint = next((cifar / "ckpt").glob("*step=7.ckpt"))

    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    resumed = Recorder()
    trainer(cifar / "resumed", enable_checkpointing=False).fit(
        resumed, datamodule=datamodule(cifar), ckpt_path=str(checkpoint)
    )
    expected = reference.train_batches[7:]
    assert [(e, b) for e, b, _, _ in resumed.train_batches] == [(e, b) for e, b, _, _ in expected]
    for (_, _, x, y), (_, _, x_ref, y_ref) in zip(resumed.train_batches, expected):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    for name, p in reference.named_parameters():
        assert torch.equal(dict(resumed.named_parameters())[name], p), name
