"""The machine's own matmul peak, so step times become efficiencies that travel between machines.

    python benchmarks/roofline.py jax      # one JSON line: GFLOP/s of fp32 matmuls in JAX
    python benchmarks/roofline.py torch    # the same in torch
    python benchmarks/roofline.py jax bf16 # bf16 operands (JAX: accumulated and returned in fp32)

A step's efficiency is its flops over its time, divided by the best plain matmul rate the same
framework reaches on the same machine for the model's own projection shapes ([tokens, in] x
[in, out], in the step's operand dtype). Two frameworks, or two machines, are then compared on how much of what the
machine can do each one gets, not on seconds that depend on which machine ran them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

# SmolLM2-135M at batch 4 x 128: q/o (576 -> 576), k/v (576 -> 192), gate/up (576 -> 1536), down (1536 -> 576)
PROJECTIONS = ((512, 576, 576), (512, 576, 192), (512, 576, 1536), (512, 1536, 576))
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # the command lines' short names -> array dtype names


def machine() -> dict:
    """CPU model, the cores this process may use, and the vector/matrix extensions present."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(cpu=cpu, cores=cores, flags=[f for f in FLAGS if f in flags])


def describe(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {' '.join(m['flags']) or 'no AVX2'}"


def _median_seconds(run, args: tuple, repeats: int) -> float:
    run(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_gflops(shapes=PROJECTIONS, repeats: int = 20, dtype: str = "float32") -> dict:
    """GFLOP/s of ``x @ w`` in JAX for each ``(tokens, in, out)``, and ``peak``, the best.
    ``dtype="bfloat16"``: bf16 operands accumulated in fp32, as the example model's bf16 matmuls."""
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
    rates = {}
    for m, k, n in shapes:
        x, w = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
        seconds = _median_seconds(lambda x, w: matmul(x, w).block_until_ready(), (x, w), repeats)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / seconds / 1e9
    return dict(rates, peak=max(rates.values()))


def torch_gflops(shapes=PROJECTIONS, repeats: int = 20, dtype: str = "float32") -> dict:
    """As `jax_gflops`, in torch (``x @ w`` in ``dtype``, no grad)."""
    import torch

    rates = {}
    with torch.no_grad():
        for m, k, n in shapes:
            x, w = torch.ones(m, k, dtype=getattr(torch, dtype)), torch.ones(k, n, dtype=getattr(torch, dtype))
            rates[f"{m}x{k}x{n}"] = 2 * m * k * n / _median_seconds(torch.matmul, (x, w), repeats) / 1e9
    return dict(rates, peak=max(rates.values()))


if __name__ == "__main__":
    framework = sys.argv[1] if len(sys.argv) > 1 else "jax"
    dtype = DTYPES[sys.argv[2] if len(sys.argv) > 2 else "fp32"]
    rates = {"jax": jax_gflops, "torch": torch_gflops}[framework](dtype=dtype)
    print(json.dumps(dict(framework=framework, dtype=dtype, machine=machine(), gflops=rates)))
