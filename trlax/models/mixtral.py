"""Mixtral (`model_type` mixtral, MixtralForCausalLM): Mistral attention + a sparse MoE block.

The modules are trlax/models/moe.py's; the feed-forward is `block_sparse_moe` (router
`gate`, experts stored per expert as `experts.{e}.w1|w3|w2`, as transformers 5 writes them).
"""

from __future__ import annotations

from trlax.models.moe import MIXTRAL_EXPERT_KEYS, moe_spec

SPEC = moe_spec("mixtral", "MixtralForCausalLM", peft_targets=("q_proj", "v_proj"),
                stacked_weights=MIXTRAL_EXPERT_KEYS, peft_fused_targets=("gate", "w1", "w2", "w3"))
