"""Profile trlax's decode step: where each step of `generate` spends its time, op by op.

    python benchmarks/profile_decode.py [--model small|tiny] [--batch 8] [--prompt 32] [--new 64]
        [--sample] [--rollout-dtype bfloat16] [--repeats 5] [--xla-flags "..."] [--out FILE]

Builds the benchmark's GPT-2 (random weights from the config, seed 0: `cases.MODELS`),
then:

1. times `model.generate` (eos off, exactly `new` tokens per row): first call (compile)
   and the median of `repeats` calls, without the profiler;
2. records one call with `jax.profiler.trace` and maps every XLA event to its HLO
   instruction in the compiled module: instructions inside the decode `while` loop are
   the decode step (their time / `new` = ms per step), the rest is the prompt pass and
   setup. It prints the top ops per step (fused ops, output shape, JAX source) and the
   same time grouped by JAX source (layer numbers folded);
3. lists every copy / transpose / convert inside the loop whose output is at least one
   layer's K (or V) cache buffer or the smallest weight matrix, i.e. a per-step copy of
   the cache or of a weight, and the large ones outside it (paid once per call).

The profiler adds a little time per op, so the per-op times sum to a bit more than the
timed step; use `benchmarks/run.py` for throughput claims against PyTorch.
XLA flags (`--xla-flags`) are set in XLA_FLAGS before jax is imported, for this process only.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import MODELS  # noqa: E402
from env import set_env  # noqa: E402
from hlo_report import Module, decode_loop, fused_ops, large_moves, parse  # noqa: E402


def build(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    import jax.numpy as jnp
    import numpy as np
    import transformers

    import trlax

    cfg = transformers.GPT2Config(**MODELS[args.model])
    model = trlax.FlaxAutoModelForCausalLM.from_config(cfg, seed=0)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size - 1, (args.batch, args.prompt)), jnp.int32)
    kwargs: dict[str, Any] = {"max_new_tokens": args.new, "eos_token_id": [], "pad_token_id": cfg.vocab_size - 1,
                              "do_sample": args.sample}
    if args.sample:
        import jax

        kwargs.update(top_k=0, top_p=0.9, temperature=1.0, prng_key=jax.random.key(0))
    if args.rollout_dtype:
        kwargs["rollout_dtype"] = jnp.dtype(args.rollout_dtype)
    return model, ids, kwargs


def trace_events(run: Any) -> dict[str, tuple[float, int]]:
    """{event name: (total ns, count)} of one profiled call, over every host thread."""
    import jax

    folder = tempfile.mkdtemp(prefix="trlax-profile-")
    with jax.profiler.trace(folder):
        run()
    path = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))[-1]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                entry = totals[event.name]
                entry[0] += event.duration_ns
                entry[1] += 1
    return {name: (ns, int(count)) for name, (ns, count) in totals.items()}


def source(op_name: str) -> str:
    """A JAX op_name, loop prefix dropped and layer indices folded: '.../h/*/attn/c_proj/dot_general'."""
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    name = re.sub(r"^(while/body/)+", "", name)
    return re.sub(r"/(\d+)/", "/*/", name) or "(no source)"


def report(module: Module, events: dict[str, tuple[float, int]], steps: int, cache_leaf_bytes: int,
           min_weight_bytes: int, top: int) -> list[str]:
    loop = decode_loop(module)
    in_loop = module.scheduled(loop.body)
    control = {"while", "conditional", "call"}
    step_ns: dict[str, float] = {}
    outside_ns = 0.0
    for name, (ns, _) in events.items():
        inst = module.by_name.get(name)
        if inst is None or inst.opcode in control:
            continue
        if inst.computation in in_loop:
            step_ns[name] = ns / steps
        else:
            outside_ns += ns
    total_step = sum(step_ns.values())
    lines = [f"decode loop `{loop.name}`: {len(step_ns)} ops with events; per step (profiled): "
             f"{total_step / 1e6:.3f} ms; outside the loop (prompt pass, setup): {outside_ns / 1e6:.2f} ms per call",
             "", f"### Top {top} ops per decode step", "",
             "| ms/step | % | op | fused ops | output | JAX source |", "|---|---|---|---|---|---|"]
    for name, ns in sorted(step_ns.items(), key=lambda kv: -kv[1])[:top]:
        inst = module.by_name[name]
        ops = "+".join(fused_ops(module, inst)[:6])
        lines.append(f"| {ns / 1e6:.3f} | {100 * ns / total_step:.1f} | {name} ({inst.kind or inst.opcode}) | {ops} "
                     f"| {inst.shape} | {source(inst.op_name)} |")
    groups: dict[str, float] = collections.defaultdict(float)
    for name, ns in step_ns.items():
        groups[source(module.by_name[name].op_name)] += ns
    lines += ["", "### Per decode step by JAX source (all layers together)", "", "| ms/step | % | JAX source |",
              "|---|---|---|"]
    for name, ns in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {ns / 1e6:.3f} | {100 * ns / total_step:.1f} | {name} |")

    threshold = min(cache_leaf_bytes, min_weight_bytes)
    lines += ["", f"### Copies, transposes, converts of >= {threshold / 2**20:.2f} MB (one layer's K cache: "
                  f"{cache_leaf_bytes / 2**20:.2f} MB; smallest weight matrix: {min_weight_bytes / 2**20:.2f} MB)", ""]
    moves = large_moves(module, in_loop | {module.entry}, threshold)
    for inst in moves:
        per_step = inst.computation in in_loop
        where = "PER STEP (inside the decode loop)" if per_step else "once per call (outside the loop)"
        ns = events.get(inst.name, (0.0, 0))[0] / (steps if per_step else 1)
        lines.append(f"- {where}: {inst.name} {inst.shape} ({inst.bytes / 2**20:.2f} MB), "
                     f"{ns / 1e6:.3f} ms{'/step' if per_step else ''}: {source(inst.op_name)}")
    if not moves:
        lines.append("- none: no cache-sized or weight-sized copy, transpose or convert, inside the loop or out")
    updates = [i for c in in_loop for i in module.computations[c]
               if "dynamic-update-slice" in fused_ops(module, i) and i.bytes >= cache_leaf_bytes]
    if updates:
        ms = sum(step_ns.get(i.name, 0.0) for i in updates) / 1e6
        lines.append(f"- cache writes: {len(updates)} dynamic-update-slice ops on cache-sized buffers, "
                     f"{ms:.3f} ms/step together (in place: a copy of each would take ~"
                     f"{cache_leaf_bytes / 4.3e9 * 1e3:.2f} ms at XLA:CPU's copy speed)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="top_p 0.9 sampling instead of greedy")
    parser.add_argument("--rollout-dtype", default=None, help="e.g. bfloat16 (generate(rollout_dtype=...))")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this process")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    set_env("trlax", "cpu")
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags

    import jax
    import numpy as np

    model, ids, kwargs = build(args)

    def run() -> Any:
        return jax.block_until_ready(model.generate(ids, **kwargs).sequences)

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    assert out.shape == (args.batch, args.prompt + args.new), out.shape
    median = statistics.median(times)

    module = parse(model.generation_cache.compiled_text())
    events = trace_events(run)

    cfg = model.config
    geometry = model.spec.cache_geometry(cfg)
    itemsize = np.dtype(kwargs.get("rollout_dtype", np.float32)).itemsize
    cache_leaf = args.batch * (args.prompt + args.new) * geometry.num_kv_heads * geometry.head_dim * itemsize
    weights = [leaf for leaf in jax.tree_util.tree_leaves(model.params) if leaf.ndim >= 2]
    min_weight = min(w.size for w in weights) * itemsize
    header = [
        f"# Decode profile: GPT-2 {args.model} ({cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}), "
        f"batch {args.batch}, prompt {args.prompt} + {args.new} new, "
        f"{'top_p 0.9 sampling' if args.sample else 'greedy'}, "
        f"rollout dtype {args.rollout_dtype or 'model dtype (float32)'}",
        "",
        f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; CPU: {cpu_name()}",
        f"generate: first call {first:.2f} s (compile + run); steady {median * 1e3:.1f} ms per call "
        f"(median of {args.repeats}, min {min(times) * 1e3:.1f}) = {median * 1e3 / args.new:.3f} ms per new token "
        f"step (prompt pass amortised in), {args.batch * args.new / median:.1f} new tok/s",
        "",
    ]
    text = "\n".join(header + report(module, events, args.new, cache_leaf, min_weight, args.top))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
