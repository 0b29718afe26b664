"""Hardware limit probes: matmul peak and memory bandwidth, per framework, in their own process.

    python benchmarks/hardware.py --impl jax|torch [--device cpu|gpu] [--quick]

prints one result line (see common.emit): {"impl", "probes": {name: {"median", "min",
"max", "n", "unit", "noise"}}}. Probes: `matmul_f32` / `matmul_bf16` (GFLOP/s of an
N x N @ N x N product: jitted `jnp.dot` or `torch.mm`; N = 2048 on CPU, 8192 on GPU),
`read` (GB/s of a full sum over a 1 GiB float32 array), `copy` (GB/s counting read +
write of a 1 GiB elementwise copy) and `stream_b8` (GB/s of weights read by batch-8 float32
matmuls, x [8, 768] @ W [768, 3072] over distinct W totalling 1 GiB: a decode step's access
pattern, every weight read once from memory, at the framework's own matmul). Each: 2 warm-up
calls, then 10 timed (rate of each).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import NoiseMeter, emit, summarize  # noqa: E402
from env import configure_process  # noqa: E402

# The stream_b8 probe's weight shape: GPT-2 small's MLP input projection.
STREAM_WEIGHT = (768, 3072)
STREAM_BATCH = 8


def _rates(fn: Callable[[], Any], sync: Callable[[Any], Any], amount: float, warmup: int,
           repeats: int) -> dict[str, Any]:
    """amount / seconds for each timed call of fn (amount in GFLOP or GB)."""
    for _ in range(warmup):
        sync(fn())
    meter = NoiseMeter()
    meter.start()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        rates.append(amount / (time.perf_counter() - start))
    return {**summarize(rates), "noise": meter.stop()}


def jax_probes(n: int, nbytes: int, warmup: int, repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    def sync(x: Any) -> Any:
        return jax.block_until_ready(x)

    out = {"device": str(jax.devices()[0])}
    key = jax.random.key(0)
    # The dots trlax's models run: float32, and bfloat16 inputs accumulated in float32 (a bf16 -> bf16 dot is a
    # slower XLA:CPU kernel that no model uses).
    for dtype, name in ((jnp.float32, "matmul_f32"), (jnp.bfloat16, "matmul_bf16")):
        a = jax.random.normal(key, (n, n), dtype)
        b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
        dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
        out[name] = {**_rates(lambda a=a, b=b, dot=dot: dot(a, b), sync, 2 * n**3 / 1e9, warmup, repeats),
                     "unit": "GFLOP/s",
                     "call": f"jax.jit(jnp.dot, preferred_element_type=float32) {n}x{n} {jnp.dtype(dtype).name}"}
        del a, b
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    copy = jax.jit(lambda v: v + 1.0)
    out["read"] = {**_rates(lambda: total(x), sync, nbytes / 1e9, warmup, repeats), "unit": "GB/s",
                   "call": f"jax.jit(jnp.sum) over {nbytes >> 20} MiB"}
    out["copy"] = {**_rates(lambda: copy(x), sync, 2 * nbytes / 1e9, warmup, repeats), "unit": "GB/s",
                   "call": f"jax.jit(x + 1) over {nbytes >> 20} MiB (read + write)"}
    count = stream_count(nbytes)
    weights = [jax.random.normal(jax.random.fold_in(key, i), STREAM_WEIGHT, jnp.float32) for i in range(count)]
    rows = jnp.ones((STREAM_BATCH, STREAM_WEIGHT[0]), jnp.float32)
    stream = jax.jit(lambda rows, weights: [jnp.dot(rows, w) for w in weights])
    out["stream_b8"] = {**_rates(lambda: stream(rows, weights), sync, count * weight_bytes() / 1e9, warmup, repeats),
                        "unit": "GB/s", "call": stream_call("jax.jit(jnp.dot)", count)}
    return out


def weight_bytes() -> int:
    return STREAM_WEIGHT[0] * STREAM_WEIGHT[1] * 4


def stream_count(nbytes: int) -> int:
    """How many distinct stream_b8 weights make `nbytes` (at least 2)."""
    return max(2, nbytes // weight_bytes())


def stream_call(call: str, count: int) -> str:
    return (f"{call} [{STREAM_BATCH}, {STREAM_WEIGHT[0]}] @ {count} distinct [{STREAM_WEIGHT[0]}, "
            f"{STREAM_WEIGHT[1]}] float32 ({count * weight_bytes() >> 20} MiB)")


def torch_probes(n: int, nbytes: int, warmup: int, repeats: int, gpu: bool) -> dict[str, Any]:
    import torch

    device = "cuda" if gpu else "cpu"

    def sync(x: Any) -> Any:
        if gpu:
            torch.cuda.synchronize()
        return x

    out = {"device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"}
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype, name in ((torch.float32, "matmul_f32"), (torch.bfloat16, "matmul_bf16")):
        a = torch.randn((n, n), generator=gen, device=device, dtype=dtype)
        b = torch.randn((n, n), generator=gen, device=device, dtype=dtype)
        out[name] = {**_rates(lambda a=a, b=b: torch.mm(a, b), sync, 2 * n**3 / 1e9, warmup, repeats),
                     "unit": "GFLOP/s", "call": f"torch.mm {n}x{n} {str(dtype).removeprefix('torch.')}"}
        del a, b
    x = torch.ones((nbytes // 4,), dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    out["read"] = {**_rates(lambda: x.sum(), sync, nbytes / 1e9, warmup, repeats), "unit": "GB/s",
                   "call": f"torch.sum over {nbytes >> 20} MiB"}
    out["copy"] = {**_rates(lambda: y.copy_(x), sync, 2 * nbytes / 1e9, warmup, repeats), "unit": "GB/s",
                   "call": f"torch copy_ over {nbytes >> 20} MiB (read + write)"}
    count = stream_count(nbytes)
    weights = [torch.randn(STREAM_WEIGHT, generator=gen, device=device) for _ in range(count)]
    rows = torch.ones((STREAM_BATCH, STREAM_WEIGHT[0]), device=device)
    with torch.inference_mode():
        out["stream_b8"] = {**_rates(lambda: [rows @ w for w in weights], sync, count * weight_bytes() / 1e9, warmup,
                                     repeats), "unit": "GB/s", "call": stream_call("torch.matmul", count)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("jax", "torch"), required=True)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--f32-matmul", choices=("default", "highest"), default="default")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 + 2 calls: a smoke test")
    args = parser.parse_args()
    gpu = args.device == "gpu"
    configure_process(args.impl if args.impl == "torch" else "trlax", args.device, args.f32_matmul)
    n = 256 if args.quick else (8192 if gpu else 2048)
    nbytes = (16 if args.quick else 1024) << 20
    warmup, repeats = (1, 2) if args.quick else (2, 10)
    probes = jax_probes(n, nbytes, warmup, repeats) if args.impl == "jax" else torch_probes(
        n, nbytes, warmup, repeats, gpu)
    emit({"impl": args.impl, "device": args.device, "probes": probes})


if __name__ == "__main__":
    main()
