"""Training and evaluation throughput of a config, through the real LightningModule (not a copy).

    python benchmarks/throughput.py --config configs/mnist/p1h_ep.yaml [--batches 200] [--seconds S]
        [--device cpu|cuda] [--threads 1] [--synthetic] [--set model.init_args.T=40 ...]

``--synthetic`` replaces the config's data module by ``SyntheticImages`` (seeded uniform images shaped like the
network's input, random labels; the config's batch size): the throughput of a config whose dataset is not on this
machine (CIFAR). ``epoch_s`` then extrapolates ``--epoch_samples`` (default 60,000) samples.

Prints a human-readable summary, then one JSON line with keys including ``train_samples_per_s``,
``eval_samples_per_s``, ``epoch_s`` (``--epoch_samples`` extrapolated), ``peak_mem_mb``, ``activation_mb``
(autograd-saved tensors of one training step: the BPTT trajectory) and the machine (CPU, threads, torch, GPU).
For conv nets (``ConvPrototypicalNet``) also ``train_gflops`` / ``eval_gflops``: the relaxation's convolutions per
second, counted as ``relaxation_gflop_per_sample`` (``conv_relaxation_flops``: the drive's convolution once, then
every step's forward and feedback convolutions; 2 FLOPs per multiply-add; the EP update, BPTT's backward and the fc
layers not counted).
Timing excludes ``--warmup`` batches (compilation, allocator warm-up); ``--seconds`` ends the timed training early
(after at least one timed batch). Never used for assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ep_lightning.cli import cli_main
from ep_lightning.data import MNISTDataModule
from ep_lightning.runtime import configure_threads, tune_allocator

#: Trainer settings of a measurement: nothing but the training and evaluation loops (no logger, checkpoints,
#: progress bar, model summary or callbacks).
QUIET_TRAINER = [
    "--trainer.logger", "false",
    "--trainer.enable_checkpointing", "false",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.callbacks", "[]",
]  # fmt: skip


class SyntheticImages(MNISTDataModule):
    """Seeded uniform images of ``input_shape`` in [0, 1) and uniform random labels, for timing only: ``train_subset``
    (default 4,096) training and ``test_subset`` (default 1,024) test images. A subclass of the CLI's data base class
    so that ``--data`` accepts it; it reads no file (``data_dir`` is unused)."""

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        batch_size: int = 20,
        eval_batch_size: int = 1000,
        train_subset: int | None = None,
        test_subset: int | None = None,
        device_resident: bool = False,
        seed: int = 0,
        data_dir: str = "data",
        val_size: int = 0,
        split_seed: int = 0,
        verify_checksums: bool = False,
        num_workers: int = 0,
        download: bool = False,
        return_index: bool = False,
        val_split: str = "random",
        shuffle: bool = True,
    ) -> None:
        # The data base class reads its options from the concrete class's signature: the shared ones are declared
        # here too (unused: nothing is read, split or downloaded).
        super().__init__(data_dir=data_dir, batch_size=batch_size, eval_batch_size=eval_batch_size)
        self.save_hyperparameters()
        self.input_shape = tuple(int(n) for n in input_shape)
        self.num_classes = int(num_classes)

    def prepare_data(self) -> None:
        """Nothing to fetch."""

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        sizes = {"train": self.hparams.train_subset or 4096, "test": self.hparams.test_subset or 1024}
        device = self.trainer.strategy.root_device if self.hparams.device_resident and self.trainer else "cpu"
        self.sets = {
            split: torch.utils.data.TensorDataset(
                torch.rand(n, *self.input_shape, generator=generator).to(device),
                torch.randint(0, self.num_classes, (n,), generator=generator).to(device),
            )
            for split, n in sizes.items()
        }

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.sets["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> list:
        return []

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.sets["test"], batch_size=self.hparams.eval_batch_size)


def synthetic_config(config: str, out_dir: Path) -> str:
    """A copy of ``config`` whose data module is ``SyntheticImages`` with the network's input shape and classes and
    the config's batch size (written to ``out_dir``)."""
    import yaml

    raw = yaml.safe_load(Path(config).read_text())
    net = raw["model"]["init_args"]["net"]["init_args"]
    if "layers" in net:
        shape, classes = [int(net["layers"][0])], int(net["layers"][-1])
    else:
        shape = [int(net.get("input_channels", 1)), int(net.get("input_size", 28)), int(net.get("input_size", 28))]
        classes = int(net.get("num_classes", 10))
    batch = int(((raw.get("data") or {}).get("init_args") or {}).get("batch_size", 20))
    raw["data"] = {
        "class_path": "throughput.SyntheticImages",
        "init_args": {"input_shape": shape, "num_classes": classes, "batch_size": batch},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"synthetic_{Path(config).stem}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


class BatchTimer(L.Callback):
    """Wall time of training batches after ``warmup`` batches (synchronising CUDA at both ends)."""

    def __init__(self, warmup: int, seconds: float | None = None) -> None:
        self.warmup = warmup
        self.seconds = seconds
        self.start: float | None = None
        self.timed_batches = 0
        self.samples = 0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.timed_batches += 1
            self.samples += batch[1].shape[0]
            if self.seconds is not None and time.perf_counter() - self.start >= self.seconds:
                trainer.should_stop = True

    def elapsed(self, module: L.LightningModule) -> float:
        self._sync(module)
        assert self.start is not None, "not enough batches to time: raise --batches"
        return time.perf_counter() - self.start


def activation_megabytes(module: L.LightningModule, batch) -> float | None:
    """MB of tensors autograd saves for backward during one training step's update (what BPTT stores per step);
    None for systems without an EP / BPTT update (initializer distillation)."""
    from ep_lightning.systems import EstimatorSystem

    if not isinstance(module, EstimatorSystem):
        return None
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x, labels = batch[0], batch[1]
        target = module.net.encode_target(labels, x)
        start = module.initial_state(x)
        if module.algorithm == "ep":
            module.ep_update(x, target, start)
        else:
            module.bptt_update(x, target, start)
    return saved / 2**20


def conv_layer_macs(net: torch.nn.Module, i: int) -> int:
    """Multiply-adds per sample of conv layer ``i`` (0-based) of a ``ConvPrototypicalNet``: C_out·C_in·k²·side², the
    same for its transpose (the feedback)."""
    conv, g = net.convs[i], net.geometry[i]
    return conv.out_channels * conv.in_channels * g.kernel**2 * g.conv**2


def conv_relaxation_flops(net: torch.nn.Module, free_steps: int, nudged_steps: int) -> float | None:
    """FLOPs per sample of one relaxation of a ``ConvPrototypicalNet`` (None for other nets): the drive conv_1(x)
    once, then per step the forward convolutions conv_2 … conv_L and their transposes, for ``free_steps`` +
    ``nudged_steps`` steps (a symmetric pair counts its two nudged phases)."""
    from ep_lightning.models import ConvPrototypicalNet

    if not isinstance(net, ConvPrototypicalNet):
        return None
    step = sum(2 * conv_layer_macs(net, i) for i in range(1, len(net.convs)))
    return 2.0 * (conv_layer_macs(net, 0) + (free_steps + nudged_steps) * step)


def inner_network(module: L.LightningModule) -> torch.nn.Module:
    """The system's energy model: attribute ``net`` (``model`` in systems that predate that name)."""
    return module.net if hasattr(module, "net") else module.model


def phase_steps(module: L.LightningModule) -> tuple[int, int]:
    """(free / negative-phase steps, nudged / positive-phase steps): ``T``, ``K`` (``T_minus``, ``T_plus`` in
    Initialized EP systems that predate the shared names)."""
    if hasattr(module, "T_minus"):
        return module.T_minus, module.T_plus
    return module.T, module.K


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batches", type=int, default=200, help="timed training batches (at most)")
    parser.add_argument("--seconds", type=float, default=None, help="stop the timed training after this many seconds")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--eval_batches", type=int, default=5, help="timed evaluation batches (eval_batch_size each)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--no_malloc_tuning", action="store_true", help="leave glibc's allocator thresholds as they are"
    )
    parser.add_argument("--synthetic", action="store_true", help="time on SyntheticImages instead of the config's data")
    parser.add_argument("--epoch_samples", type=int, default=60000, help="samples per epoch for epoch_s")
    parser.add_argument("--set", nargs="*", default=[], help="extra CLI overrides key=value, e.g. model.init_args.T=40")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """Train ``warmup + batches`` batches and time evaluation of ``eval_batches``; returns the JSON record."""
    configure_threads(args.threads)
    malloc_tuned = not args.no_malloc_tuning and tune_allocator()

    overrides = []
    for item in args.set:
        key, value = item.split("=", 1)
        overrides += [f"--{key}", value]
    train_batches = args.warmup + args.batches
    config = synthetic_config(args.config, Path("/tmp/ep_benchmark")) if args.synthetic else args.config
    if args.synthetic:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # `throughput.SyntheticImages` importable
    cli = cli_main(
        [
            "--config",
            config,
            *QUIET_TRAINER,
            "--trainer.accelerator",
            args.device,
            "--trainer.devices",
            "1",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            str(train_batches),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.limit_test_batches",
            str(args.eval_batches + 1),
            "--trainer.default_root_dir",
            "/tmp/ep_benchmark",
            "--threads",
            str(torch.get_num_threads()),
            "--malloc_tuning",
            str(malloc_tuned).lower(),
            *overrides,
        ],
        run=False,
    )
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    timer = BatchTimer(args.warmup, args.seconds)
    trainer.callbacks.append(timer)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=datamodule)
    train_s = timer.elapsed(module)
    train_rate = timer.samples / train_s

    # Evaluation: time the test loop (first batch excluded as warm-up by timing the rest).
    datamodule.setup("test")
    test_loader = datamodule.test_dataloader()
    batches = [b for _, b in zip(range(args.eval_batches + 1), test_loader)]
    module.eval()
    batches = [trainer.strategy.batch_to_device(b) for b in batches]
    module.free_phase(batches[0][0], module.eval_steps)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    n_eval = 0
    for x, _ in batches[1:]:
        module.free_phase(x, module.eval_steps)
        n_eval += x.shape[0]
    if args.device == "cuda":
        torch.cuda.synchronize()
    eval_rate = n_eval / (time.perf_counter() - start)

    module.train()
    sample_batch = trainer.strategy.batch_to_device(next(iter(datamodule.train_dataloader())))
    act_mb = activation_megabytes(module, sample_batch)
    free_steps, nudged_steps = module.T, module.K
    if getattr(module, "algorithm", "ep") == "bptt":
        train_flops = conv_relaxation_flops(inner_network(module), free_steps, 0)
    else:
        phases = 2 if getattr(module, "nudging", "one_sided") == "symmetric" else 1
        train_flops = conv_relaxation_flops(inner_network(module), free_steps, phases * nudged_steps)
    eval_flops = conv_relaxation_flops(inner_network(module), module.eval_steps, 0)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "config": args.config,
        "overrides": args.set,
        "module": type(module).__name__,
        "algorithm": getattr(module, "algorithm", "ep"),
        "T": free_steps,
        "K": nudged_steps,
        "batch_size": datamodule.hparams.batch_size,
        "timed_batches": timer.timed_batches,
        "train_samples_per_s": round(train_rate, 1),
        "train_ms_per_batch": round(1e3 * train_s / max(timer.timed_batches, 1), 3),
        "epoch_s": round(args.epoch_samples / train_rate, 1),
        "epoch_samples": args.epoch_samples,
        "synthetic_data": args.synthetic,
        "eval_samples_per_s": round(eval_rate, 1),
        "peak_mem_mb": round(peak, 1),
        "peak_mem_kind": "cuda max_memory_allocated" if args.device == "cuda" else "process max RSS",
        "activation_mb": round(act_mb, 3) if act_mb is not None else None,
        "relaxation_gflop_per_sample": round(train_flops / 1e9, 4) if train_flops is not None else None,
        "train_gflops": round(train_flops * train_rate / 1e9, 2) if train_flops is not None else None,
        "eval_gflops": round(eval_flops * eval_rate / 1e9, 2) if eval_flops is not None else None,
        "device": args.device,
        "malloc_tuning": malloc_tuned,
        **machine(),
    }


def main() -> None:
    args = parse_args()
    sys.argv = sys.argv[:1]  # the CLI below gets its arguments explicitly
    result = measure(args)
    train_rate, act_mb = result["train_samples_per_s"], result["activation_mb"]
    print(
        f"{args.config}: train {train_rate:,.0f} samples/s ({result['epoch_s']:.1f} s/epoch, "
        f"{result['train_ms_per_batch']:.3f} ms/batch), eval {result['eval_samples_per_s']:,.0f} samples/s, "
        f"activations {'n/a' if act_mb is None else f'{act_mb:.2f} MB'}, peak {result['peak_mem_mb']:.0f} MB"
        + (
            f"; convolutions {result['train_gflops']} GFLOP/s training, {result['eval_gflops']} GFLOP/s evaluation "
            f"({result['relaxation_gflop_per_sample']} GFLOP per training sample)"
            if result["train_gflops"] is not None
            else ""
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
