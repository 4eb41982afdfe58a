"""How close a conv net's relaxation comes to the machine's convolution FLOP rate (one thread by default).

    python benchmarks/conv_efficiency.py --config configs/fmnist/conv_ep.yaml [--batch N] [--steps 20]
        [--repeats 5] [--threads 1] [--set channels=[8,16] ...]

The network is built from the config's ``model.init_args.net`` (class path and init_args; ``--set`` overrides
init_args of the net, values parsed as YAML), float32, on the CPU, with the config's batch size unless ``--batch``.
It prints, per conv layer and in total:

- the plain convolution rate: ``F.conv2d`` on the shapes the relaxation convolves (conv_2 … conv_L, forward) and
  ``F.conv_transpose2d`` on its feedback shapes (their transposes), each timed alone in a loop, in the faster of the
  two memory layouts (contiguous and channels-last; both are printed);
- the relaxation rate: ``relax`` for ``--steps`` steps (no graph, from uniform random states in the network's
  ``relaxation_layout``, so pooling windows have distinct maxima), counting the forward and feedback convolutions of
  every step (2 FLOPs per multiply-add; the fully connected layers, pooling and σ are not counted, their time is);
- the ratio of the two: the share of the plain convolutions' speed the relaxation keeps.

The allocator is tuned as ``train.py`` tunes it (``--malloc_tuning``, default on). Times are the minimum over
``--repeats`` rounds of wall-clock time, and the process CPU time of the same rounds (on a
machine shared with other jobs the CPU time is the steadier figure). One JSON line at the end. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import conv_layer_macs, machine

from ep_lightning.models import ConvPrototypicalNet
from ep_lightning.models.conv import relaxation_layout
from ep_lightning.relaxation import relax
from ep_lightning.runtime import tune_allocator


def build_net(config: Path, overrides: list[str]) -> tuple[ConvPrototypicalNet, int]:
    """The config's network (``model.init_args.net``) with ``key=value`` overrides of its init_args, and the config's
    training batch size (``data.init_args.batch_size``, else 20)."""
    raw = yaml.safe_load(config.read_text())
    spec = raw["model"]["init_args"]["net"]
    module, _, name = spec["class_path"].rpartition(".")
    kwargs = dict(spec.get("init_args") or {})
    for item in overrides:
        key, value = item.split("=", 1)
        kwargs[key] = yaml.safe_load(value)
    net = getattr(importlib.import_module(module), name)(**kwargs)
    if not isinstance(net, ConvPrototypicalNet):
        raise SystemExit(f"{config}: model.init_args.net is {spec['class_path']}, not a ConvPrototypicalNet")
    batch = int(((raw.get("data") or {}).get("init_args") or {}).get("batch_size", 20))
    return net, batch


def clock(fn: Callable[[], Any], calls: int, repeats: int) -> tuple[float, float]:
    """(min wall-clock seconds per call, min process CPU seconds per call) over ``repeats`` rounds of ``calls``."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        walls.append((time.perf_counter() - wall) / calls)
        cpus.append((time.process_time() - cpu) / calls)
    return min(walls), min(cpus)


def time_layer(
    net: ConvPrototypicalNet, i: int, below: torch.Tensor, above: torch.Tensor, repeats: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``clock`` of conv layer ``i``'s ``F.conv2d`` on ``below`` and of its ``F.conv_transpose2d`` on ``above``."""
    conv, g = net.convs[i], net.geometry[i]
    forward = clock(lambda: F.conv2d(below, conv.weight, conv.bias, conv.stride, conv.padding), 5, repeats)
    transpose = clock(
        lambda: F.conv_transpose2d(
            above, conv.weight, stride=conv.stride, padding=conv.padding, output_padding=g.output_padding
        ),
        5,
        repeats,
    )
    return forward, transpose


def measure(net: ConvPrototypicalNet, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = net.float().eval()
    x = torch.rand(batch, net.input_channels, net.input_size, net.input_size)
    generator = torch.Generator().manual_seed(1)
    state = tuple(
        relaxation_layout(torch.rand(batch, *shape, generator=generator)) for shape in net.init_state_shapes()
    )
    channels_last = torch.channels_last
    layers = []
    total_flops, total_wall, total_cpu = 0.0, 0.0, 0.0
    with torch.no_grad():
        drive = net.drive(x)
        for i in range(1, len(net.convs)):
            conv, g = net.convs[i], net.geometry[i]
            below = state[i - 1].contiguous()
            above = torch.rand(batch, conv.out_channels, g.conv, g.conv, generator=generator)
            flops = 2.0 * conv_layer_macs(net, i) * batch
            timings = {
                layout: time_layer(
                    net, i, below.contiguous(memory_format=fmt), above.contiguous(memory_format=fmt), repeats
                )
                for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", channels_last))
            }
            # the faster layout of each convolution (wall-clock), and its CPU time
            fwd = min((t[0] for t in timings.values()), key=lambda t: t[0])
            bwd = min((t[1] for t in timings.values()), key=lambda t: t[0])
            layers.append(
                {
                    "layer": i + 1,
                    "shape": f"{conv.in_channels}x{g.below}x{g.below} -> {conv.out_channels}x{g.conv}x{g.conv}, "
                    f"k{g.kernel} s{g.stride} p{g.padding} pool {g.pool}",
                    "mflop_per_call": round(flops / 1e6, 2),
                    "conv2d_gflops": round(flops / fwd[0] / 1e9, 1),
                    "conv_transpose2d_gflops": round(flops / bwd[0] / 1e9, 1),
                    "conv2d_gflops_cpu_time": round(flops / fwd[1] / 1e9, 1),
                    "conv_transpose2d_gflops_cpu_time": round(flops / bwd[1] / 1e9, 1),
                    "by_layout_gflops": {
                        layout: [round(flops / f[0] / 1e9, 1), round(flops / t[0] / 1e9, 1)]
                        for layout, (f, t) in timings.items()
                    },
                }
            )
            total_flops += 2 * flops
            total_wall += fwd[0] + bwd[0]
            total_cpu += fwd[1] + bwd[1]
        relax_wall, relax_cpu = clock(lambda: relax(net, drive, state, steps), 1, repeats)
    step_flops = total_flops  # forward + feedback convolutions of one step, whole batch
    return {
        "batch": batch,
        "steps": steps,
        "layers": layers,
        "step_gflop": round(step_flops / 1e9, 4),
        "plain_conv_gflops": round(step_flops / total_wall / 1e9, 1),
        "plain_conv_gflops_cpu_time": round(step_flops / total_cpu / 1e9, 1),
        "relaxation_ms_per_step": round(1e3 * relax_wall / steps, 3),
        "relaxation_gflops": round(steps * step_flops / relax_wall / 1e9, 1),
        "relaxation_gflops_cpu_time": round(steps * step_flops / relax_cpu / 1e9, 1),
        "relaxation_share_of_plain": round(total_wall * steps / relax_wall, 3),
        "relaxation_share_of_plain_cpu_time": round(total_cpu * steps / relax_cpu, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the net's init_args, key=value (YAML)")
    parser.add_argument(
        "--no_malloc_tuning", action="store_true", help="leave glibc's allocator thresholds as they are"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc_tuned = not args.no_malloc_tuning and tune_allocator()  # as train.py does by default
    net, batch = build_net(args.config, args.set)
    result = {
        "config": str(args.config),
        "overrides": args.set,
        **measure(net, args.batch or batch, args.steps, args.repeats),
    }
    result |= {"malloc_tuning": malloc_tuned, **machine()}
    for layer in result["layers"]:
        print(
            f"conv{layer['layer']} {layer['shape']}: {layer['mflop_per_call']} MFLOP per call; conv2d "
            f"{layer['conv2d_gflops']} GFLOP/s, conv_transpose2d {layer['conv_transpose2d_gflops']} GFLOP/s "
            f"(CPU time: {layer['conv2d_gflops_cpu_time']}, {layer['conv_transpose2d_gflops_cpu_time']})"
        )
    print(
        f"{args.config} batch {result['batch']}: plain convolutions {result['plain_conv_gflops']} GFLOP/s "
        f"(CPU time {result['plain_conv_gflops_cpu_time']}); relaxation {result['relaxation_gflops']} GFLOP/s "
        f"(CPU time {result['relaxation_gflops_cpu_time']}), {result['relaxation_ms_per_step']} ms per step: "
        f"{100 * result['relaxation_share_of_plain']:.0f} % of the plain rate "
        f"({100 * result['relaxation_share_of_plain_cpu_time']:.0f} % in CPU time)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
