"""MoE forward throughput vs the dense model of the same active size, trlax and PyTorch side by side.

A Mixtral-shaped model (E experts, top-k, expert width I) against a Mistral of the same
shape whose MLP width is k * I (the same active parameters and FLOPs per token), float32,
one forward over [B, T] tokens. Prints tokens/s (median of `--repeats` timed calls after
a warm-up) for: trlax MoE, trlax dense, torch MoE, torch dense.

    python benchmarks/moe_forward.py [--experts 8 --top-k 2 --batch 4 --seq 128 --repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
import transformers

from trlax import FlaxAutoModelForCausalLM


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (compiles for trlax)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("experts", 8), ("top-k", 2), ("hidden", 256), ("expert-width", 512), ("layers", 4),
                          ("batch", 4), ("seq", 128), ("repeats", 10)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    a = parser.parse_args()
    common = {"vocab_size": 1024, "hidden_size": a.hidden, "num_hidden_layers": a.layers, "num_attention_heads": 8,
              "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}
    configs = {
        "moe": transformers.MixtralConfig(**common, intermediate_size=a.expert_width, num_local_experts=a.experts,
                                          num_experts_per_tok=a.top_k),
        "dense": transformers.MistralConfig(**common, intermediate_size=a.top_k * a.expert_width),
    }
    ids = np.random.default_rng(0).integers(0, 1024, (a.batch, a.seq))
    mask = np.ones_like(ids)
    tokens = a.batch * a.seq
    results = {}
    torch.set_grad_enabled(False)
    for name, config in configs.items():
        model = FlaxAutoModelForCausalLM.from_config(config)
        results[f"trlax {name}"] = _median_seconds(
            lambda model=model: jax.block_until_ready(model(ids, mask).logits), a.repeats)
        pt = transformers.AutoModelForCausalLM.from_config(config).eval()
        t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
        results[f"torch {name}"] = _median_seconds(
            lambda pt=pt, t_ids=t_ids, t_mask=t_mask: pt(t_ids, attention_mask=t_mask).logits, a.repeats)
    print(f"MoE: {a.experts} experts, top-{a.top_k}, expert width {a.expert_width}; dense: MLP width "
          f"{a.top_k * a.expert_width}; hidden {a.hidden}, {a.layers} layers, batch {a.batch} x {a.seq} tokens, f32, "
          f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
    for name, seconds in results.items():
        print(f"{name:12s} {tokens / seconds:10.0f} tok/s  ({seconds * 1e3:.1f} ms)")
    for lib in ("trlax", "torch"):
        print(f"{lib}: MoE / dense throughput = {results[f'{lib} dense'] / results[f'{lib} moe']:.2f}")
    print(f"MoE trlax / torch throughput = {results['torch moe'] / results['trlax moe']:.2f}")


if __name__ == "__main__":
    main()
