"""FLOP and byte counts of GPT-2 shaped models, and the limits they imply on a measured machine.

Same accounting as the anchors (shared/notes/perf-anchors.md), so the numbers compare:
- forward FLOPs = 2 x matmul params x tokens + 4 x layers x batch x seq^2 x width
  (attention QK^T and AV counted in full, not halved for causality);
- train step = 3 x forward (forward + backward);
- decode FLOPs per token = 2 x matmul params + 4 x layers x mean context x width, the
  mean context being prompt + new / 2;
- decode bandwidth bound = batch / (param bytes / read bandwidth) tokens/s (every step
  reads every parameter once); compute bound = matmul peak / decode FLOPs per token;
  roofline = the smaller of the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def matmul_params(cfg: Mapping[str, Any]) -> int:
    """Parameters that take part in matmuls: 12 d^2 per layer (qkv, proj, 4x MLP) + the LM head."""
    d = cfg["n_embd"]
    return cfg["n_layer"] * 12 * d * d + cfg["vocab_size"] * d


def total_params(cfg: Mapping[str, Any]) -> int:
    """All GPT-2 parameters (tied LM head counted once): embeddings, layers (with biases, norms), final norm."""
    d = cfg["n_embd"]
    return cfg["vocab_size"] * d + cfg["n_positions"] * d + cfg["n_layer"] * (12 * d * d + 13 * d) + 2 * d


def forward_flops(cfg: Mapping[str, Any], batch: int, seq: int) -> float:
    return 2.0 * matmul_params(cfg) * batch * seq + 4.0 * cfg["n_layer"] * batch * seq * seq * cfg["n_embd"]


def decode_flops_per_token(cfg: Mapping[str, Any], prompt: int, new_tokens: int) -> float:
    context = prompt + new_tokens / 2
    return 2.0 * matmul_params(cfg) + 4.0 * cfg["n_layer"] * context * cfg["n_embd"]


def decode_bounds(cfg: Mapping[str, Any], batch: int, prompt: int, new_tokens: int, peak_flops: float,
                  read_bytes_per_s: float, param_bytes: int = 4) -> dict[str, float]:
    """New tokens/s a batched decode can reach: bandwidth bound, compute bound, roofline = min."""
    bandwidth = batch / (total_params(cfg) * param_bytes / read_bytes_per_s)
    compute = peak_flops / decode_flops_per_token(cfg, prompt, new_tokens)
    return {"bandwidth_tok_s": bandwidth, "compute_tok_s": compute, "roofline_tok_s": min(bandwidth, compute)}


def fraction_of_limit(kind: str, cfg: Mapping[str, Any], shapes: Any, throughput: float, peak_flops: float | None,
                      read_bytes_per_s: float | None, param_bytes: int = 4) -> float | None:
    """The measured throughput as a fraction of its hardware limit (None where no limit applies).

    forward/reference: achieved FLOP/s / matmul peak; train: 3 x forward FLOPs per step;
    generate: new tokens/s / decode roofline (weights of `param_bytes` each). `throughput` is in
    the case's own work units per second (tokens, steps, new tokens).
    """
    if not peak_flops or throughput is None:
        return None
    if kind in ("forward", "reference"):
        return throughput * forward_flops(cfg, 1, shapes.seq) / shapes.seq / peak_flops
    if kind == "train":
        return throughput * 3 * forward_flops(cfg, shapes.batch, shapes.seq) / peak_flops
    if kind == "generate" and read_bytes_per_s:
        bounds = decode_bounds(cfg, shapes.batch, shapes.prompt, shapes.new_tokens, peak_flops, read_bytes_per_s,
                               param_bytes)
        return throughput / bounds["roofline_tok_s"]
    return None
