"""Qwen3-MoE (`model_type` qwen3_moe, Qwen3MoeForCausalLM): Qwen3 attention (q/k RMSNorm) + MoE.

The modules are trlax/models/moe.py's; the feed-forward is `mlp` (router `gate`, experts
stored per expert as `experts.{e}.gate_proj|up_proj|down_proj`), or a dense MLP in the
layers `mlp_only_layers` / `decoder_sparse_step` leave dense. PEFT has no default LoRA
targets for qwen3_moe, so `target_modules` must be given (as in PEFT).
"""

from __future__ import annotations

from trlax.models.moe import QWEN3_MOE_EXPERT_KEYS, moe_spec

SPEC = moe_spec("qwen3_moe", "Qwen3MoeForCausalLM", peft_targets=(), stacked_weights=QWEN3_MOE_EXPERT_KEYS,
                peft_fused_targets=("gate", "gate_proj", "up_proj", "down_proj"))
