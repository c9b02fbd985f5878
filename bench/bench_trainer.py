"""One genome's training throughput: the fmnas_jax jitted step vs an equivalent PyTorch eager loop.

    .venv/bin/python bench/bench_trainer.py                       # paper's genome, batch 128, float32
    .venv/bin/python bench/bench_trainer.py --genome 'NC 64 7 relu;RC 32 3 relu;NC 32 3 relu;RC 64 3 relu;FL relu;'
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ...                        # as the package's own processes run (fmnas_jax.runtime)
    .venv/bin/python bench/bench_trainer.py --torch-python /opt/torchvenv/bin/python --rounds 3

The JAX side runs the package's step both ways: fused (one program per step, the final retrain's) and
composed of shared pieces (a search's evaluations'), in this process with XLA's default threads. Both
sides train the same architecture (Conv -> act -> BatchNorm x4, GAP, Dense(64, act), Dense(10))
with Adam on the same real Fashion-MNIST batches, in alternating rounds in one run on one machine.
The PyTorch side runs in a subprocess (torch may live in another Python, e.g. 3.11). Prints a table,
the FLOP/s reached against the CPU's peak, and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fmnas_jax import Genome
from fmnas_jax.data import FashionMnistData, load
from fmnas_jax.genome import PAPER_GENOME as PAPER
from fmnas_jax.genome import train_flops_per_image
from fmnas_jax.train import TrainConfig, TrainState, compiled_programs, init_state, to_device

TORCH_CANDIDATES = (os.environ.get("FMNAS_TORCH_PYTHON", ""), "/opt/torchvenv/bin/python", "python3.11")

TORCH_SIDE = r"""
import json, sys, time
import numpy as np, torch
from torch import nn
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "swish": nn.SiLU, "gelu": nn.GELU}
layers, c_in = [], 1
for kind, f, k, act in cfg["convs"]:
    if kind == "NC":
        layers.append(nn.Conv2d(c_in, f, k, stride=1, padding="same"))
    else:
        layers.append(nn.Conv2d(c_in, f, k, stride=2, padding=0))
    layers += [acts[act](), nn.BatchNorm2d(f, momentum=0.1)]
    c_in = f
model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 64), acts[cfg["head"]](), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x_all = torch.from_numpy(np.load(cfg["x"])).float().div_(255).permute(0, 3, 1, 2).contiguous()  # NCHW
y_all = torch.from_numpy(np.load(cfg["y"])).long()
b, n = cfg["batch"], x_all.shape[0]
loss_fn = nn.CrossEntropyLoss()
def run(steps):
    for i in range(steps):
        s = (i * b) % (n - b)
        x, y = x_all[s:s + b], y_all[s:s + b]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return float(loss)
run(cfg["warmup"])
out = []
for _ in range(cfg["rounds"]):
    t0 = time.perf_counter(); run(cfg["steps"]); out.append(cfg["steps"] * b / (time.perf_counter() - t0))
print(json.dumps({"images_per_second": out, "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def find_torch_python(explicit: str | None) -> str | None:
    for cand in ([explicit] if explicit else []) + list(TORCH_CANDIDATES):
        if not cand:
            continue
        try:
            subprocess.run([cand, "-c", "import torch"], check=True, capture_output=True, timeout=120)
            return cand
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def jax_rounds(genome: Genome, dd, batch: int, steps: int, rounds: int, warmup: int, fused: bool) -> list[float]:
    """Images/s of the package's train step (the whole step as one program, or composed of shared pieces)."""
    cfg = TrainConfig(batch_size=batch)
    state = init_state(genome, cfg, 0)
    programs = compiled_programs(genome, cfg, dd, fused)
    n = dd.n_train
    perm, per_epoch, key = jnp.arange(dd.x_train.shape[0]), n // batch, jax.random.key(0)
    lr = np.float32(1e-3)

    def run(k: int, state: TrainState) -> TrainState:
        acc = jnp.zeros(2)
        for i in range(k):
            state, acc = programs.step(state, acc, dd.x_train, dd.y_train, dd.norm, perm, key, lr, 0, i % per_epoch)
        acc.block_until_ready()
        return state

    state = run(warmup, state)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        state = run(steps, state)
        out.append(steps * batch / (time.perf_counter() - t0))
    return out


def cpu_peak_flops() -> tuple[float, str]:
    """Peak FP32 FLOP/s: cores x base clock x FLOPs/cycle (2 FMA units x vector width x 2)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    width = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    mhz = 0.0
    for line in flags.splitlines():
        if line.startswith("bogomips"):
            mhz = float(line.split(":")[1]) / 2  # bogomips = 2 x clock on x86
            break
    cores = os.cpu_count() or 1
    per_cycle = 2 * width * 2
    return cores * mhz * 1e6 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genome", default=PAPER)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=150, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--torch-python", default=None, help="a Python with torch installed (default: auto-detect)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="folder with the four Fashion-MNIST IDX files")
    args = p.parse_args()

    genome = Genome.parse(args.genome)
    data = load(FashionMnistData(train_size=20000, val_size=1000, dir=args.data_dir), seed=0)
    dd = to_device(data)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    np.save(tmp / "bench_x.npy", data.x_train)
    np.save(tmp / "bench_y.npy", data.y_train)
    torch_py = find_torch_python(args.torch_python)

    jax_ips, composed_ips, torch_ips, torch_info = [], [], [], {}
    for _ in range(args.rounds):  # alternate, so both sides see the same machine state
        jax_ips += jax_rounds(genome, dd, args.batch, args.steps, 1, args.warmup, fused=True)
        composed_ips += jax_rounds(genome, dd, args.batch, args.steps, 1, args.warmup, fused=False)
        if torch_py:
            spec = {"convs": [[c.kind, c.filters, c.kernel, c.activation] for c in genome.convs], "head": genome.head_activation,
                    "x": str(tmp / "bench_x.npy"), "y": str(tmp / "bench_y.npy"), "batch": args.batch, "steps": args.steps,
                    "rounds": 1, "warmup": args.warmup, "threads": os.cpu_count() or 1}  # fmt: skip
            res = subprocess.run([torch_py, "-c", TORCH_SIDE, json.dumps(spec)], capture_output=True, text=True, check=True)
            torch_info = json.loads(res.stdout.strip().splitlines()[-1])
            torch_ips += torch_info["images_per_second"]

    flops = train_flops_per_image(genome)
    peak, peak_desc = cpu_peak_flops()
    if jax.default_backend() != "cpu":
        peak, peak_desc = float("nan"), f"{jax.devices()[0].device_kind} (peak not computed)"
    j = statistics.median(jax_ips)
    rows = [(f"fmnas_jax (jax {jax.__version__}, fused step)", j), ("fmnas_jax (composed step)", statistics.median(composed_ips))]
    if torch_ips:
        rows.append((f"PyTorch {torch_info['torch']} eager ({torch_info['threads']} threads)", statistics.median(torch_ips)))
    print(f"genome: {genome}   batch {args.batch}, float32, {flops / 1e6:.2f} MFLOP per training image")
    print(f"platform: {jax.default_backend()} ({os.cpu_count()} CPUs); peak {peak / 1e9:.0f} GFLOP/s = {peak_desc}")
    print(f"{'side':<48} {'images/s':>10} {'GFLOP/s':>9} {'% peak':>7}")
    for name, ips in rows:
        print(f"{name:<48} {ips:>10,.0f} {ips * flops / 1e9:>9.1f} {100 * ips * flops / peak:>6.1f}%")
    summary = {"jax_images_per_second": j, "jax_rounds": jax_ips, "composed_rounds": composed_ips, "torch_rounds": torch_ips,
               "flops_per_image": flops, "peak_flops": peak}  # fmt: skip
    if torch_ips:
        ratio = j / statistics.median(torch_ips)
        summary["ratio"] = ratio
        print(f"summary: fmnas_jax trains {ratio:.2f}x the images/s of PyTorch eager ({j:,.0f} vs {statistics.median(torch_ips):,.0f})")
    else:
        print(f"summary: PyTorch not found (set --torch-python or FMNAS_TORCH_PYTHON); JAX alone: {j:,.0f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
