"""One command that proves and measures the accelerator path, within a time budget.

    python benchmarks/device_check.py [--budget 480] [--out runs/device_check] [--device auto|cuda|cpu] [--quick]

Parts, in order, each in its own subprocess with a timeout taken from the remaining budget (a failing or timed-out
part is recorded in the JSON and the check goes on):

1. ``machine``: GPU name, driver, torch and CUDA versions (CPU model and threads without a GPU).
2. ``cuda_tests``: ``pytest tests/test_cuda.py`` (each model's step, the EP update and the BPTT gradient on CUDA
   against float64 on the CPU, compiled relaxation, device-resident data, a short ``train.py`` fit and test; all
   skipped without CUDA).
3. ``throughput``: training and evaluation samples/s of P-1h, EB-1h, P-conv (EP) and Initialized EP, eager against
   compiled relaxation (``compile_relaxation``), device-resident data on and off (``benchmarks/throughput.py``'s
   ``measure``); then Laborieux et al.'s CIFAR-10 VGG (``configs/cifar10/vgg_ep.yaml``, T 250, K 25, symmetric) on
   synthetic CIFAR-shaped data (``throughput.py --synthetic``, epochs of 50k images), float32 and with bfloat16
   relaxation convolutions, eager before compiled, with the convolutions' GFLOP/s.
4. ``parity``: one training step with the compiled (CUDA: graph-captured) relaxation against the eager step on the
   same batch and the same weights, both against the float64 step on the CPU.
5. ``train``: P-conv EP on all 60k training images for as many epochs as the remaining budget allows, test error
   on the 10k test set after every epoch.

Everything goes to ``<out>/device_check.json`` and ``<out>/device_check.md``. ``--quick`` runs the same code paths
on tiny data (few images, few steps, few batches) so that CI can run them on a CPU in under a minute. Modules and
data modules are built from the shipped configs through the project's CLI (``cli_main(..., run=False)``), so a
renamed constructor argument only touches the configs. The figures are measurements: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: Systems measured: name → (config, whether the config's system has ``compile_relaxation``).
SYSTEMS: dict[str, tuple[str, bool]] = {
    "P-1h": ("configs/mnist/p1h_ep.yaml", True),
    "EB-1h": ("configs/mnist/eb1h_ep.yaml", True),
    "P-conv": ("configs/mnist/pconv_ep.yaml", True),
    "IEP-1h": ("configs/mnist/iep_1h.yaml", False),
    "CIFAR-10 VGG": ("configs/cifar10/vgg_ep.yaml", True),
    "CIFAR-10 VGG bf16": ("configs/cifar10/vgg_ep.yaml", True),
}
#: Systems timed on ``throughput.SyntheticImages`` (their dataset is not on the machine) and their epoch's images.
SYNTHETIC_EPOCH = {"CIFAR-10 VGG": 50_000, "CIFAR-10 VGG bf16": 50_000}
#: Overrides that make a system what its name says.
SYSTEM_OVERRIDES = {"CIFAR-10 VGG bf16": ["model.init_args.net.init_args.relaxation_conv_dtype=bfloat16"]}
#: Throughput settings (compile, resident) in the order they are measured (the budget drops the last ones first).
SETTINGS: list[tuple[bool, bool]] = [(False, True), (True, True), (False, False), (True, False)]
#: Steps per phase in ``--quick`` (tiny data, same code paths).
QUICK_STEPS = {"P-1h": (4, 2), "EB-1h": (4, 2), "P-conv": (3, 2), "IEP-1h": (2, 2), "CIFAR-10 VGG": (2, 1)}
QUICK_DATA = ["data.init_args.train_subset=60", "data.init_args.test_subset=40", "data.init_args.eval_batch_size=20"]
#: Parity of one step: P-conv runs fewer free steps than its config so that compiling the unrolled graph stays short
#: (the comparison is of the same step either way).
PARITY_STEPS = {"P-conv": (20, 10)}
PARITY_FACTOR = 10.0


# --------------------------------------------------------------------------------------------- shared helpers
def record_failure(records: Path, record: dict[str, Any], start: float, err: Exception) -> None:
    """Append ``record`` as failed with the error and the seconds since ``start``: one failing setting or system
    must not hide the others."""
    append_record(
        records,
        {
            **record,
            "status": "failed",
            "seconds": round(time.monotonic() - start, 1),
            "error": f"{type(err).__name__}: {str(err)[:500]}",
        },
    )


def step_overrides(config: str, free: int, nudged: int) -> list[str]:
    """``key=value`` overrides setting a config's free and nudged steps, under the names its system uses."""
    import yaml

    init_args = (yaml.safe_load((ROOT / config).read_text()).get("model") or {}).get("init_args") or {}
    overrides = [f"model.init_args.T={free}", f"model.init_args.K={nudged}"]
    if init_args.get("bptt_steps") is not None:  # the BPTT window must fit in the shortened T
        overrides.append(f"model.init_args.bptt_steps={min(int(init_args['bptt_steps']), free)}")
    return overrides


def cli_args(overrides: list[str]) -> list[str]:
    """``key=value`` pairs → ``--key value`` CLI arguments."""
    out: list[str] = []
    for item in overrides:
        key, value = item.split("=", 1)
        out += [f"--{key}", value]
    return out


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compiler_available() -> str | None:
    """None if inductor can compile here (CPU needs a C++ compiler), else the reason."""
    import torch

    if torch.cuda.is_available():
        return None
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler on PATH: inductor's CPU backend cannot build kernels"
    return None


def append_record(path: Path, record: dict) -> None:
    """One JSON line per finished measurement, so a part killed by its timeout keeps what it measured."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------- part: machine
def machine_info() -> dict:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "hostname_kind": platform.machine(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        if shutil.which("nvidia-smi"):
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            info["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else None
    else:
        info["gpu"] = None
        info["threads"] = torch.get_num_threads()
    return info


# --------------------------------------------------------------------------------------------- part: throughput
def throughput_order() -> list[tuple[str, bool, bool]]:
    """(system, compile, resident) in measuring order: every system's setting before the next setting; then the
    CIFAR-10 rows (device-resident synthetic data only: there is no host dataset to compare with), eager; then the
    compiled P-conv and CIFAR-10 settings (compiling their 210 / 300 unrolled steps may take minutes)."""
    order = [
        (name, compiled, resident)
        for compiled, resident in SETTINGS
        for name in SYSTEMS
        if resident or name not in SYNTHETIC_EPOCH
    ]

    def rank(item: tuple[str, bool, bool]) -> int:
        name, compiled, _ = item
        synthetic = name in SYNTHETIC_EPOCH
        return 2 * compiled * (name == "P-conv" or synthetic) + synthetic + compiled * synthetic

    return sorted(order, key=rank)


def part_throughput(args: argparse.Namespace, records: Path) -> None:
    """Every (system, compile, resident) setting, in order, while the part's time lasts."""
    import torch
    from throughput import measure, parse_args

    deadline = time.monotonic() + args.seconds
    no_compiler = compiler_available()
    for name, compiled, resident in throughput_order():
        config, compilable = SYSTEMS[name]
        record: dict[str, Any] = {"system": name, "config": config, "compile": compiled, "resident": resident}
        if compiled and not compilable:
            continue
        if args.quick and (compiled and name != "P-1h" or not resident and name != "P-1h" or name not in QUICK_STEPS):
            continue  # --quick: every code path once (compile and host data on P-1h), the rest eager on-device
        left = deadline - time.monotonic()
        if compiled and no_compiler:
            append_record(records, {**record, "status": "skipped", "reason": no_compiler})
            continue
        if left < 5:
            append_record(records, {**record, "status": "skipped", "reason": "budget exhausted"})
            continue
        overrides = [
            f"data.init_args.device_resident={str(resident).lower()}",
            f"model.init_args.compile_relaxation={str(compiled).lower()}" if compilable else "",
            *SYSTEM_OVERRIDES.get(name, []),
        ]
        synthetic = name in SYNTHETIC_EPOCH
        if args.quick:
            overrides += step_overrides(config, *QUICK_STEPS[name]) + QUICK_DATA
            overrides += ["data.init_args.batch_size=8"] if synthetic else []
            batches, warmup, eval_batches = 1, 1, 1
        else:
            batches, warmup, eval_batches = 100_000, 20 if compiled else (2 if synthetic else 5), 5
        # Timed seconds per setting, at most a third of what is left; compilation happens in the warm-up batches.
        seconds = max(3.0, min(args.per_setting, left / 3))
        argv = [
            "--config",
            config,
            "--device",
            args.device,
            "--batches",
            str(batches),
            "--warmup",
            str(warmup),
            "--eval_batches",
            str(eval_batches),
            "--seconds",
            str(seconds),
            *(["--synthetic", "--epoch_samples", str(SYNTHETIC_EPOCH[name])] if synthetic else []),
            "--set",
            *[o for o in overrides if o],
        ]
        start = time.monotonic()
        try:
            result = measure(parse_args(argv))
            append_record(
                records,
                {
                    **record,
                    "status": "ok",
                    "seconds": round(time.monotonic() - start, 1),
                    **{
                        k: result[k]
                        for k in (
                            "train_samples_per_s",
                            "train_ms_per_batch",
                            "eval_samples_per_s",
                            "epoch_s",
                            "peak_mem_mb",
                            "timed_batches",
                            "T",
                            "K",
                            "batch_size",
                            "epoch_samples",
                            "synthetic_data",
                            "train_gflops",
                            "eval_gflops",
                        )
                    },
                },
            )
        except Exception as err:  # noqa: BLE001 - recorded; one failing setting must not hide the others
            record_failure(records, record, start, err)
        torch._dynamo.reset()
        if args.device == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- part: parity
def one_step_update(config: str, device: str, overrides: list[str], precision: str) -> dict[str, Any]:
    """Weights after − before one training step of the config's system on its first batch (float64, on the CPU)."""
    import torch
    from throughput import QUIET_TRAINER

    from ep_lightning.cli import cli_main

    cli = cli_main(
        [
            "--config",
            config,
            *QUIET_TRAINER,
            "--trainer.accelerator",
            device,
            "--trainer.devices",
            "1",
            "--trainer.max_steps",
            "1",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.precision",
            precision,
            "--trainer.default_root_dir",
            "/tmp/ep_device_check",
            "--test_after_fit",
            "false",
            *cli_args(overrides),
        ],
        run=False,
    )
    before = {k: v.detach().to("cpu", torch.float64, copy=True) for k, v in cli.model.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = {k: v.detach().to("cpu", torch.float64) for k, v in cli.model.state_dict().items()}
    return {"before": before, "update": {k: after[k] - before[k] for k in before}}


def relative_error(a: dict, b: dict) -> float:
    """max over parameters of ‖a − b‖ / ‖b‖ (0 where both are 0)."""
    worst = 0.0
    for key, ref in b.items():
        denom = float(ref.norm())
        diff = float((a[key] - ref).norm())
        worst = max(worst, diff / denom if denom > 0 else diff)
    return worst


def part_parity(args: argparse.Namespace, records: Path) -> None:
    """Compiled vs eager training step on one batch; both against the float64 CPU step.

    Tolerance: the compiled and the eager step are two float32 computations of the same update that differ only in
    the order of round-off (fusion, reordered reductions, on CUDA also kernel choice). Their difference is therefore
    of the size of float32 round-off itself, which the float64 reference measures: eager's own distance to the
    float64 step. The check passes when ‖compiled − eager‖ ≤ 10 × ‖eager − float64‖ (relative, worst parameter):
    the factor 10 leaves room for a different but equally valid order of operations, while a wrong phase (β, K,
    nudge, stale CUDA-graph output) changes the update by O(1).
    """
    import torch

    no_compiler = compiler_available()
    names = ["P-1h"] if args.quick else ["P-1h", "EB-1h", "P-conv"]
    deadline = time.monotonic() + args.seconds
    for name in names:
        config, _ = SYSTEMS[name]
        record: dict[str, Any] = {"system": name, "config": config, "device": args.device}
        if no_compiler:
            append_record(records, {**record, "status": "skipped", "reason": no_compiler})
            continue
        if deadline - time.monotonic() < 10:
            append_record(records, {**record, "status": "skipped", "reason": "budget exhausted"})
            continue
        steps = QUICK_STEPS[name] if args.quick else PARITY_STEPS.get(name)
        overrides = [f"data.init_args.device_resident={'true' if args.device == 'cuda' else 'false'}"]
        overrides += step_overrides(config, *steps) if steps else []
        overrides += QUICK_DATA if args.quick else ["data.init_args.train_subset=200"]
        start = time.monotonic()
        try:
            ref = one_step_update(config, "cpu", overrides, "64-true")
            eager = one_step_update(config, args.device, overrides, "32-true")
            compiled = one_step_update(
                config, args.device, overrides + ["model.init_args.compile_relaxation=true"], "32-true"
            )
            same_init = all(
                torch.equal(eager["before"][k], compiled["before"][k])
                and torch.equal(eager["before"][k], ref["before"][k])
                for k in ref["before"]
            )
            eager_err = relative_error(eager["update"], ref["update"])
            compiled_err = relative_error(compiled["update"], ref["update"])
            diff = relative_error(compiled["update"], eager["update"])
            tolerance = PARITY_FACTOR * max(eager_err, 1e-7)
            moved = max(float(u.abs().max()) for u in ref["update"].values())
            append_record(
                records,
                {
                    **record,
                    "status": "ok" if same_init and moved > 0 and diff <= tolerance else "failed",
                    "steps": steps,
                    "same_initial_weights": same_init,
                    "update_max_abs": moved,
                    "eager_vs_float64": eager_err,
                    "compiled_vs_float64": compiled_err,
                    "compiled_vs_eager": diff,
                    "tolerance": tolerance,
                    "seconds": round(time.monotonic() - start, 1),
                },
            )
        except Exception as err:  # noqa: BLE001 - recorded; one failing system must not hide the others
            record_failure(records, record, start, err)
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- part: train
def part_train(args: argparse.Namespace, records: Path) -> None:
    """P-conv EP on the full training set while the part's time lasts; test error after every (partial) epoch."""
    import lightning as L
    import torch
    from throughput import QUIET_TRAINER, inner_network

    from ep_lightning.cli import cli_main

    deadline = time.monotonic() + args.seconds
    config, _ = SYSTEMS["P-conv"]
    overrides = [
        f"data.init_args.device_resident={'true' if args.device == 'cuda' else 'false'}",
        f"model.init_args.compile_relaxation={str(args.train_compile).lower()}",
    ]
    if args.quick:
        overrides += step_overrides(config, *QUICK_STEPS["P-conv"]) + QUICK_DATA
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
            "2" if args.quick else "1000",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.default_root_dir",
            "/tmp/ep_device_check",
            "--test_after_fit",
            "false",
            *cli_args(overrides),
        ],
        run=False,
    )
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    class BudgetedEpochs(L.Callback):
        """Test error after every epoch; stops when the next epoch (or batch) would overrun the deadline."""

        def __init__(self) -> None:
            self.epoch_start = time.monotonic()
            self.batches = 0
            self.epoch_s: float | None = None
            self.eval_s = 0.0
            self.recorded_epoch = -1

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.epoch_start, self.batches = time.monotonic(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches += 1
            if time.monotonic() + self.eval_s + 2 > deadline:
                trainer.should_stop = True

        def test_error(self, pl_module: L.LightningModule) -> float:
            datamodule.setup("test")
            net = inner_network(pl_module)
            wrong = total = 0
            for batch in datamodule.test_dataloader():
                x, labels = trainer.strategy.batch_to_device(batch)[:2]
                predicted = net.predict(pl_module.free_phase(x, pl_module.eval_steps))
                wrong += int((predicted != labels).sum())
                total += labels.shape[0]
            return 100.0 * wrong / total

        def record(self, trainer: L.Trainer, pl_module: L.LightningModule, complete: bool) -> None:
            sync()
            train_s = time.monotonic() - self.epoch_start
            start = time.monotonic()
            error = self.test_error(pl_module)
            sync()
            self.eval_s = time.monotonic() - start
            self.recorded_epoch = trainer.current_epoch
            if complete:
                self.epoch_s = train_s
            append_record(
                records,
                {
                    "epoch": trainer.current_epoch + 1,
                    "complete_epoch": complete,
                    "batches": self.batches,
                    "train_images": len(datamodule.train_set),
                    "samples": self.batches * datamodule.hparams.batch_size,
                    "train_s": round(train_s, 2),
                    "train_samples_per_s": round(self.batches * datamodule.hparams.batch_size / max(train_s, 1e-9), 1),
                    "test_error_percent": round(error, 2),
                    "test_s": round(self.eval_s, 2),
                },
            )

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            full = trainer.num_training_batches
            self.record(trainer, pl_module, complete=self.batches >= full)
            if self.epoch_s is not None and time.monotonic() + self.epoch_s + self.eval_s > deadline:
                trainer.should_stop = True

    trainer.callbacks.append(BudgetedEpochs())
    append_record(records, {"setup": {"config": config, "overrides": overrides, "device": args.device}})
    trainer.fit(module, datamodule=datamodule)


PARTS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "throughput": part_throughput,
    "parity": part_parity,
    "train": part_train,
}


# --------------------------------------------------------------------------------------------- orchestration
class Budget:
    """Wall-clock budget of the whole check; every part asks it how long it may run."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def run_part(name: str, args: argparse.Namespace, seconds: float, out: Path, extra: list[str] = ()) -> dict:
    """Run one part as a subprocess of this script; its records survive a timeout (JSON lines written as it goes)."""
    records = out / "parts" / f"{name}.jsonl"
    records.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        name,
        "--device",
        args.device,
        "--seconds",
        f"{seconds:.1f}",
        "--records",
        str(records),
        "--per_setting",
        str(args.per_setting),
        *extra,
    ]
    if args.quick:
        cmd.append("--quick")
    start = time.monotonic()
    # The part stops itself at ``seconds``; the timeout only catches a part stuck in one call (e.g. compilation).
    timeout = seconds + (30 if args.quick else 90)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        status, rc, tail = ("ok" if proc.returncode == 0 else "failed"), proc.returncode, proc.stderr[-2000:]
    except subprocess.TimeoutExpired as err:
        status, rc = "timed out", None
        tail = (err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or ""))[-2000:]
    rows = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    result = {"status": status, "seconds": round(time.monotonic() - start, 1), "returncode": rc, "records": rows}
    if status != "ok":
        result["stderr_tail"] = tail
    return result


def run_cuda_tests(seconds: float) -> dict:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds, env=env, check=False)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"status": "timed out", "seconds": round(time.monotonic() - start, 1), "output_tail": out[-3000:]}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if re.search(r"\b(passed|failed|skipped|error)", line)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", summary)}
    # exit 5: nothing collected/run; all skipped exits 0. Anything failing or erroring is a failed part.
    status = "ok" if proc.returncode == 0 and not counts.get("failed") else "failed"
    if counts and set(counts) == {"skipped"}:
        status = "skipped"
    return {
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "returncode": proc.returncode,
        "summary": summary,
        "counts": counts,
        "output_tail": proc.stdout[-3000:],
    }


def pick_train_compile(throughput: dict) -> bool:
    """Train P-conv with the compiled relaxation only if it was measured faster than eager (device-resident data)."""
    rates = {
        r["compile"]: r["train_samples_per_s"]
        for r in throughput.get("records", [])
        if r.get("system") == "P-conv" and r.get("resident") and r.get("status") == "ok"
    }
    return bool(rates.get(True, 0) > rates.get(False, float("inf")))


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Device check",
        "",
        f"Machine: {m.get('gpu') or 'no GPU'}"
        + (
            f" (driver {m.get('driver')}, CUDA {m.get('cuda')}, {m.get('gpu_memory_gib')} GiB)"
            if m.get("gpu")
            else f", CPU {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('threads')} torch threads)"
        )
        + f"; torch {m.get('torch')}, Python {m.get('python')}. Device used: {report['device']}; "
        f"budget {report['budget_s']} s, used {report['elapsed_s']} s; quick: {report['quick']}.",
        "",
    ]
    tests = report["cuda_tests"]
    lines += ["## CUDA tests (`tests/test_cuda.py`)", "", f"{tests['status']}: {tests.get('summary', '')}", ""]
    lines += [
        "## Throughput (samples/s)",
        "",
        "| system | relaxation | data | train | ms/batch | eval | epoch | conv GFLOP/s (train) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["throughput"].get("records", []):
        rel = "compiled" if r["compile"] else "eager"
        data = "device-resident" if r["resident"] else "host → device"
        if r["status"] == "ok":
            data = "synthetic, device-resident" if r.get("synthetic_data") else data
            gflops = f"{r['train_gflops']:,.0f}" if r.get("train_gflops") is not None else "—"
            lines.append(
                f"| {r['system']} (T {r['T']}, K {r['K']}) | {rel} | {data} | {r['train_samples_per_s']:,.1f} | "
                f"{r['train_ms_per_batch']:.2f} | {r['eval_samples_per_s']:,.1f} | {r['epoch_s']:.0f} s "
                f"({r.get('epoch_samples', 60000) // 1000}k) | {gflops} | ok |"
            )
        else:
            lines.append(
                f"| {r['system']} | {rel} | {data} | — | — | — | — | — | {r['status']}: "
                f"{r.get('reason') or r.get('error', '')[:120]} |"
            )
    lines += [
        "",
        "## Compiled vs eager training step (same batch, same weights)",
        "",
        "| system | steps (T, K) | eager vs float64 | compiled vs float64 | compiled vs eager | tolerance | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["parity"].get("records", []):
        if "compiled_vs_eager" in r:
            lines.append(
                f"| {r['system']} | {r['steps'] or 'config'} | {r['eager_vs_float64']:.2e} | "
                f"{r['compiled_vs_float64']:.2e} | {r['compiled_vs_eager']:.2e} | {r['tolerance']:.2e} | "
                f"{r['status']} |"
            )
        else:
            lines.append(
                f"| {r['system']} | — | — | — | — | — | {r['status']}: {r.get('reason') or r.get('error', '')[:120]} |"
            )
    lines += [
        "",
        (
            "Relative errors are max over parameters of ‖a − b‖/‖b‖ of the weight update; tolerance = 10 × "
            "eager's distance to float64 (see `part_parity`)."
        ),
        "",
        "## P-conv EP, budgeted training",
        "",
        "| epoch | complete | samples | train s | samples/s | test error | test s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["train"].get("records", []):
        if "epoch" in r:
            lines.append(
                f"| {r['epoch']} | {'yes' if r['complete_epoch'] else 'no'} | {r['samples']:,} | "
                f"{r['train_s']:.1f} | {r['train_samples_per_s']:,.1f} | {r['test_error_percent']:.2f} % | "
                f"{r['test_s']:.1f} |"
            )
    for part in ("throughput", "parity", "train"):
        if report[part]["status"] != "ok":
            tail = report[part].get("stderr_tail", report[part].get("reason", ""))[-800:]
            lines += [
                "",
                f"Part `{part}`: {report[part]['status']} (exit {report[part].get('returncode')}):",
                "",
                "```",
                tail,
                "```",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds for the whole check")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "device_check")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny data and few steps: the code paths, not figures")
    parser.add_argument("--per_setting", type=float, default=10.0, help="seconds of timed training per setting")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--train_compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    if args.part:  # child process: one part, records appended to --records
        sys.argv = sys.argv[:1]
        args.records.parent.mkdir(parents=True, exist_ok=True)
        PARTS[args.part](args, args.records)
        return

    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": args.device,
        "quick": args.quick,
        "budget_s": args.budget,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report["machine"] = machine_info()
    print("machine:", json.dumps(report["machine"]), flush=True)
    if args.device == "cuda" and not report["machine"]["cuda_available"]:
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device auto or cpu")

    # Shares of the budget: tests ≤ 35 %, then 47 % of what is left for throughput, 30 % of the rest for parity; the
    # remainder trains P-conv. A part that ends early leaves its time to the next ones.
    report["cuda_tests"] = run_cuda_tests(max(10.0, min(budget.left() * 0.35, 240.0)))
    print("cuda_tests:", report["cuda_tests"]["status"], report["cuda_tests"].get("summary", ""), flush=True)
    for name, share in (("throughput", 0.47), ("parity", 0.3)):
        seconds = budget.left() * share
        if seconds < 5:
            report[name] = {"status": "skipped", "reason": "budget exhausted", "records": []}
        else:
            report[name] = run_part(name, args, seconds, args.out)
        print(f"{name}: {report[name]['status']} ({len(report[name]['records'])} records)", flush=True)
    extra = ["--train_compile"] if pick_train_compile(report["throughput"]) else []
    seconds = budget.left() - (5 if args.quick else 30)  # leave time to write the report
    if seconds < 5:
        report["train"] = {"status": "skipped", "reason": "budget exhausted", "records": []}
    else:
        report["train"] = run_part("train", args, seconds, args.out, extra)
        report["train"]["compile_relaxation"] = bool(extra)
    print(f"train: {report['train']['status']} ({len(report['train']['records'])} records)", flush=True)

    report["elapsed_s"] = round(args.budget - budget.left(), 1)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "device_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'device_check.json'} and {args.out / 'device_check.md'}")


if __name__ == "__main__":
    main()
