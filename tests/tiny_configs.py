"""Tiny transformers configs, one per supported model_type, shared by the generic tests.

Each entry builds a fresh config: float32, dropout off, small enough that a parity test
runs in well under a second. Model families add their entries here.
"""

from __future__ import annotations

from collections.abc import Callable

import transformers


def gpt2() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1)


# Llama family: 2 layers, hidden 32, 4 query heads. Between them they cover GQA/MQA, tied and
# untied heads, biases, an explicit head_dim != hidden/heads, and sliding windows short
# enough (4) that sequences of 9-12 tokens hit them.
_LLAMA_COMMON = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                 "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def llama() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(**_LLAMA_COMMON, num_key_value_heads=2, tie_word_embeddings=False,
                                    attention_bias=True, mlp_bias=True)


def mistral() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(**_LLAMA_COMMON, num_key_value_heads=2, sliding_window=4,
                                      tie_word_embeddings=False)


def qwen2() -> transformers.PretrainedConfig:
    # Layer 0 full attention, layer 1 sliding (max_window_layers=1).
    return transformers.Qwen2Config(**_LLAMA_COMMON, num_key_value_heads=1, tie_word_embeddings=True,
                                    use_sliding_window=True, sliding_window=4, max_window_layers=1)


def qwen3() -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(**_LLAMA_COMMON, num_key_value_heads=2, head_dim=16, attention_bias=True,
                                    tie_word_embeddings=False)


def gemma() -> transformers.PretrainedConfig:
    return transformers.GemmaConfig(**_LLAMA_COMMON, num_key_value_heads=1, head_dim=16)


def gemma2() -> transformers.PretrainedConfig:
    # Layer 0 sliding (window 4), layer 1 full; both soft-caps small enough to bite.
    return transformers.Gemma2Config(**_LLAMA_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                     query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                                     final_logit_softcapping=3.0)


def opt() -> transformers.PretrainedConfig:
    # OPT-350m's shape: post-LN and word_embed_proj_dim != hidden_size (project_in / project_out).
    return transformers.OPTConfig(vocab_size=101, hidden_size=32, word_embed_proj_dim=16, ffn_dim=48,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                  do_layer_norm_before=False, dropout=0.0, bos_token_id=0, eos_token_id=2,
                                  pad_token_id=1)


def gpt_neo() -> transformers.PretrainedConfig:
    # Layer 0 global, layer 1 local with a window (4) shorter than the test sequences.
    return transformers.GPTNeoConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4,
                                     attention_types=[[["global", "local"], 1]], window_size=4,
                                     max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1)


def gpt_neox() -> transformers.PretrainedConfig:
    # Pythia's shape: partial rotary (a quarter of each 16-dim head), parallel residual, untied head.
    return transformers.GPTNeoXConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=48, max_position_embeddings=64,
                                      rotary_pct=0.25, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def gemma3_text() -> transformers.PretrainedConfig:
    # Layer 0 sliding (window 4, RoPE base 50), layer 1 global (base 1000, linear scaling x2, as
    # Gemma 3's 4B+ checkpoints scale theirs); logit soft-capping small enough to bite.
    return transformers.Gemma3TextConfig(
        **_LLAMA_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}})


def phi3() -> transformers.PretrainedConfig:
    # Phi-4-mini's shape: GQA, partial rotary (0.75 of each 8-dim head); a sliding window of 4.
    return transformers.Phi3Config(**_LLAMA_COMMON, num_key_value_heads=2, sliding_window=4,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.75})


def phi() -> transformers.PretrainedConfig:
    # Phi-2's shape (partial rotary 0.5, untied biased head) with GQA and the optional q/k LayerNorms.
    return transformers.PhiConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  qk_layernorm=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def starcoder2() -> transformers.PretrainedConfig:
    # Biased projections and LayerNorms, GELU MLP, tied head, a sliding window of 4.
    return transformers.Starcoder2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         sliding_window=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def bloom() -> transformers.PretrainedConfig:
    # 6 heads: not a power of two, so ALiBi's extra slopes are used too.
    return transformers.BloomConfig(vocab_size=101, hidden_size=48, n_layer=2, n_head=6, bos_token_id=0,
                                    eos_token_id=1, pad_token_id=1)


def falcon() -> transformers.PretrainedConfig:
    # The new decoder architecture (Falcon-40B/180B, Falcon 2): 2 KV groups of 2 query heads,
    # ln_attn / ln_mlp, rotary, biased projections, untied head. Other layouts: tests/test_falcon_parity.py.
    return transformers.FalconConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True, bias=True,
                                     ffn_hidden_size=48, max_position_embeddings=64, tie_word_embeddings=False,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1)


def gptj() -> transformers.PretrainedConfig:
    # Half of each 8-dim head rotates (rotary_dim 4), untied biased head.
    return transformers.GPTJConfig(vocab_size=101, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48,
                                   n_positions=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def cohere() -> transformers.PretrainedConfig:
    # GQA, per-head q/k LayerNorms, biased attention, a logit_scale that is not 1, untied head.
    return transformers.CohereConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True,
                                     attention_bias=True, logit_scale=0.5, tie_word_embeddings=False,
                                     max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def granite(**overrides: object) -> transformers.PretrainedConfig:
    # Granite 3.0 2B's multipliers (its attention_multiplier is 1/64, here 0.2 != head_dim ** -0.5), GQA, tied head.
    kwargs = {**_LLAMA_COMMON, "num_key_value_heads": 2, "tie_word_embeddings": True, "embedding_multiplier": 12.0,
              "residual_multiplier": 0.22, "attention_multiplier": 0.2, "logits_scaling": 8.0}
    return transformers.GraniteConfig(**{**kwargs, **overrides})


# GPT-2-style config names (n_embd, n_layer, ...): GPT-J and GPT-BigCode.
_GPT2_STYLE = {"vocab_size": 101, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 0,
               "eos_token_id": 1, "pad_token_id": 1}


def gpt_bigcode(**overrides: object) -> transformers.PretrainedConfig:
    # StarCoder 1's shape: multi-query attention (one K/V head for the 4 query heads), tied head, tanh GELU.
    return transformers.GPTBigCodeConfig(**{**_GPT2_STYLE, **overrides})


def smollm3(**overrides: object) -> transformers.PretrainedConfig:
    # NoPE on layer 1 (no_rope_layer_interval 2), which is also the sliding layer (window 4), GQA, tied head.
    kwargs = {**_LLAMA_COMMON, "num_key_value_heads": 2, "no_rope_layer_interval": 2, "use_sliding_window": True,
              "sliding_window": 4}
    return transformers.SmolLM3Config(**{**kwargs, **overrides})


def olmo2() -> transformers.PretrainedConfig:
    # OLMo 2's shape: post-sublayer RMSNorms, q/k norms over all heads (GQA: k_norm spans 2 heads), no biases,
    # untied head.
    return transformers.Olmo2Config(**_LLAMA_COMMON, num_key_value_heads=2, tie_word_embeddings=False)


def olmo3() -> transformers.PretrainedConfig:
    # Layer 0 sliding (window 4, RoPE base 50), layer 1 full (base 1000 with YaRN, as OLMo 3's long-context
    # checkpoints scale their full layers).
    return transformers.Olmo3Config(
        **_LLAMA_COMMON, num_key_value_heads=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                         "full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                            "rope_theta": 1000.0}})


def glm4(**overrides: object) -> transformers.PretrainedConfig:
    # GLM-4-0414's shape: biased q/k/v (no o_proj bias), a fused gate_up_proj, half of each 8-dim head rotated in
    # interleaved pairs, four norms per block, GQA, untied head.
    kwargs = {**_LLAMA_COMMON, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}
    return transformers.Glm4Config(**{**kwargs, **overrides})


def glm(**overrides: object) -> transformers.PretrainedConfig:
    # GLM-4-9B-chat's shape: GLM-4's block with two norms (pre-norm, as Llama's).
    kwargs = {**_LLAMA_COMMON, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}
    return transformers.GlmConfig(**{**kwargs, **overrides})


TINY_CAUSAL: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2": gpt2,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma": gemma,
    "gemma2": gemma2,
    "opt": opt,
    "gpt_neo": gpt_neo,
    "gpt_neox": gpt_neox,
    "gemma3_text": gemma3_text,
    "phi3": phi3,
    "phi": phi,
    "starcoder2": starcoder2,
    "bloom": bloom,
    "falcon": falcon,
    "gptj": gptj,
    "cohere": cohere,
    "granite": granite,
    "gpt_bigcode": gpt_bigcode,
    "smollm3": smollm3,
    "olmo2": olmo2,
    "olmo3": olmo3,
    "glm4": glm4,
    "glm": glm,
}


# Variants of the causal types above: every switch a family's code branches on gets a config.
def _gpt2(**overrides: object) -> transformers.PretrainedConfig:
    config = gpt2()
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _opt_pre_ln(**overrides: object) -> transformers.PretrainedConfig:
    config = opt()
    config.do_layer_norm_before = True
    config.word_embed_proj_dim = config.hidden_size
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _llama_rope(**rope: object) -> transformers.PretrainedConfig:
    config = llama()
    config.rope_parameters = dict(rope)
    return config


def _gemma3_rope(**per_type: dict) -> transformers.PretrainedConfig:
    config = gemma3_text()
    config.rope_parameters = {**config.rope_parameters, **per_type}
    return config


def _neox(**overrides: object) -> transformers.PretrainedConfig:
    kwargs = gpt_neox().to_dict()
    kwargs.pop("rope_parameters")  # rebuilt from rotary_pct / rotary_emb_base, as an old config.json has them
    return transformers.GPTNeoXConfig.from_dict({**kwargs, **overrides})


# llama3's and yarn's numbers put one frequency in each of their three bands (kept, interpolated,
# divided by `factor`) for head_dim 8; yarn's attention factor (0.1 * log(4) + 1) scales cos and sin.
ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 100.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 4.0,
             "beta_slow": 1.0, "rope_theta": 100.0},
}

CAUSAL_VARIANTS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gpt2/untied": lambda: _gpt2(tie_word_embeddings=False),
    "gpt2/inverse_layer_idx": lambda: _gpt2(scale_attn_by_inverse_layer_idx=True),
    "gpt2/reorder_upcast": lambda: _gpt2(reorder_and_upcast_attn=True),
    "gpt2/gelu_exact_no_scale": lambda: _gpt2(activation_function="gelu", scale_attn_weights=False, n_inner=48),
    **{f"llama/rope_{name}": (lambda rope=rope: _llama_rope(**rope)) for name, rope in ROPE_VARIANTS.items()},
    # OPT-125m's shape: pre-LN, tied head, embeddings in the hidden size.
    "opt/pre_ln": _opt_pre_ln,
    # Every other OPT switch: projected pre-LN, no biases, no LayerNorm params, no final norm, untied head.
    "opt/bare": lambda: _opt_pre_ln(word_embed_proj_dim=16, enable_bias=False, layer_norm_elementwise_affine=False,
                                    _remove_final_layer_norm=True, tie_word_embeddings=False),
    # Local layer first, a window of 3, an untied head, a non-default MLP width and activation.
    "gpt_neo/local_global_w3_untied": lambda: transformers.GPTNeoConfig(
        vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["local", "global"], 1]],
        window_size=3, intermediate_size=40, activation_function="gelu", tie_word_embeddings=False,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=1),
    # Sequential residual, every dim rotated, tied head, rotary base 500, no attention biases.
    "gpt_neox/sequential_rot100": lambda: _neox(use_parallel_residual=False, rotary_pct=1.0,
                                                tie_word_embeddings=True, rotary_emb_base=500,
                                                attention_bias=False),
    # Linear RoPE scaling with half of each head rotated.
    "gpt_neox/linear_rope_rot50": lambda: _neox(rope_scaling={"type": "linear", "factor": 4.0}, rotary_pct=0.5,
                                                rotary_emb_base=1000),
    # YaRN on half of each head, with its own attention factor and untruncated correction dims (an old config.json).
    "gpt_neox/yarn_rot50_untruncated": lambda: _neox(
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "truncate": False,
                      "attention_factor": 1.5, "beta_fast": 8.0}, rotary_pct=0.5, rotary_emb_base=1000),
    # Gemma 3 with YaRN on its global layer (a per-layer-type dict).
    "gemma3_text/yarn_global": lambda: _gemma3_rope(full_attention={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "rope_theta": 1000.0}),
}


def bloom_post_ln_untied(**overrides: object) -> transformers.PretrainedConfig:
    # 8 heads (a power of two), the residual taken after the norm, an untied head; pretraining_tp
    # (BLOOM-176B's 4) without slow_but_exact changes nothing.
    return transformers.BloomConfig(vocab_size=101, hidden_size=32, n_layer=2, n_head=8,
                                    apply_residual_connection_post_layernorm=True, tie_word_embeddings=False,
                                    pretraining_tp=4, bos_token_id=0, eos_token_id=1, pad_token_id=1, **overrides)


def falcon_with(**overrides: object) -> transformers.PretrainedConfig:
    kwargs = {"vocab_size": 101, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "ffn_hidden_size": 48, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1,
              "pad_token_id": 1}
    return transformers.FalconConfig(**{**kwargs, **overrides})


def gptj_with(**overrides: object) -> transformers.PretrainedConfig:
    return transformers.GPTJConfig(**{**_GPT2_STYLE, **overrides})


def cohere_with(**overrides: object) -> transformers.PretrainedConfig:
    kwargs = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1,
              "pad_token_id": 1}
    return transformers.CohereConfig(**{**kwargs, **overrides})


def _with(config: transformers.PretrainedConfig, **overrides: object) -> transformers.PretrainedConfig:
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _phi2_like() -> transformers.PretrainedConfig:
    # Phi-2's own switches: multi-head attention, no q/k LayerNorm; a quarter of each head rotated, linear scaling.
    config = phi()
    config.num_key_value_heads, config.qk_layernorm = 4, False
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 0.25}
    return config


def phi3_longrope(kind: str = "longrope", original: int = 32) -> transformers.PretrainedConfig:
    """Phi-4-mini's kind of RoPE on the tiny Phi-3 (an old config.json's `rope_scaling` of type `kind`: "su" and
    "yarn" are Phi-3's names for it): partial rotary (3 frequencies), distinct short and long factors, a
    pretraining length `original` below max_position_embeddings (64), so the attention factor is > 1."""
    config = phi3().to_dict()
    config.pop("rope_parameters")
    config["rope_scaling"] = {"type": kind, "short_factor": [1.6, 1.3, 1.05], "long_factor": [2.0, 4.4, 4.7],
                              "partial_rotary_factor": 0.75}
    config["original_max_position_embeddings"] = original
    return transformers.Phi3Config.from_dict(config)


FAMILY_VARIANTS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "bloom/post_ln_8heads_untied": bloom_post_ln_untied,
    # The new architecture with one shared norm (num_ln_in_parallel_attn=1) and a single KV group, tied head.
    "falcon/new_arch_one_ln_mqa": lambda: falcon_with(new_decoder_architecture=True, num_kv_heads=1,
                                                  num_ln_in_parallel_attn=1,
                                                  rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 500.0}),
    # Falcon-7B: multi-query attention, parallel attention and MLP on one input_layernorm.
    "falcon/7b_multi_query_parallel": lambda: falcon_with(multi_query=True, parallel_attn=True, activation="gelu"),
    # Falcon-RW: ALiBi, per-head [q|k|v], a sequential block, biases.
    "falcon/rw_alibi_sequential": lambda: falcon_with(alibi=True, multi_query=False, parallel_attn=False, bias=True),
    # ALiBi on the new architecture, 6 heads (ALiBi's extra slopes), untied head.
    "falcon/alibi_new_arch_6heads": lambda: falcon_with(alibi=True, new_decoder_architecture=True,
                                                        num_attention_heads=6, num_kv_heads=3, hidden_size=48,
                                                        tie_word_embeddings=False),
    # Every dim of each head rotated, the head's weight tied to wte (its bias stays its own), exact GELU.
    "gptj/rot8_tied": lambda: gptj_with(rotary_dim=8, tie_word_embeddings=True, activation_function="gelu"),
    # Command-R's shape: no q/k norm, full MHA, tied head, the default logit_scale 0.0625, linear RoPE scaling.
    "cohere/tied_linear_rope": lambda: cohere_with(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 500.0}),
    "phi/mha_linear_rope": _phi2_like,
    # LongRoPE within its pretraining length (32): the short factors and the attention factor sqrt(1.2).
    "phi3/longrope": phi3_longrope,
    # A head tied to embed_tokens keeps its own bias (transformers runs it; Phi checkpoints are untied).
    "phi/tied": lambda: _with(phi(), tie_word_embeddings=True),
    # Biased attention and MLP, an untied head, logits scaled up (logits_scaling < 1), linear RoPE scaling.
    "granite/biased_untied": lambda: granite(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                             logits_scaling=0.5, embedding_multiplier=2.0, residual_multiplier=1.5,
                                             rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 500.0}),
    # Multi-head attention: c_attn laid out per head as [q | k | v], a KV cache of n_head heads.
    "gpt_bigcode/multi_head": lambda: gpt_bigcode(multi_query=False),
    # NoPE on layer 0 only, full attention everywhere, biased projections and MLP, an untied head.
    "smollm3/nope_first_biased_untied": lambda: smollm3(no_rope_layers=[0, 1], use_sliding_window=False,
                                                        attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    # Every other switch: untied head, unscaled scores, exact GELU, an MLP width that is not 4 H.
    "gpt_bigcode/untied_unscaled_gelu": lambda: gpt_bigcode(tie_word_embeddings=False, scale_attn_weights=False,
                                                            activation_function="gelu", n_inner=48),
    # Biases on all four projections, MHA, head_dim 16 != hidden / heads (q_norm spans 64), tied head, linear RoPE.
    "olmo2/bias_mha_head_dim16_tied": lambda: transformers.Olmo2Config(
        **_LLAMA_COMMON, num_key_value_heads=4, head_dim=16, attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    # An OLMo 3 config.json's own form: flat rope_theta / rope_scaling (YaRN with its attention_factor), which
    # transformers puts on the full layers; 4 layers of the default layer_types (three sliding, then one full).
    "olmo3/default_layer_types_flat_rope": lambda: transformers.Olmo3Config(
        **{**_LLAMA_COMMON, "num_hidden_layers": 4}, num_key_value_heads=2, sliding_window=4, rope_theta=500.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                      "attention_factor": 1.2, "beta_fast": 32, "beta_slow": 1}),
    # No biases, every dim of each head rotated (still in interleaved pairs), a tied head, linear RoPE scaling.
    "glm4/unbiased_tied_full_rotary_linear_rope": lambda: glm4(
        attention_bias=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0, "partial_rotary_factor": 1.0}),
    # MHA, head_dim 16 != hidden / heads, YaRN on half of each head (its three bands over the 4 frequencies).
    "glm/mha_head_dim16_yarn": lambda: glm(
        num_key_value_heads=4, head_dim=16, rope_parameters={**ROPE_VARIANTS["yarn"], "partial_rotary_factor": 0.5}),
    # LongRoPE within its pretraining length (32) on half of each head: the short factors and its attention factor.
    "glm4/longrope": lambda: glm4(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "short_factor": [1.6, 1.3],
        "long_factor": [2.0, 4.4], "original_max_position_embeddings": 32}),
}
CAUSAL_VARIANTS.update(FAMILY_VARIANTS)

# T5 family: 2 encoder / 3 decoder blocks, d_kv * heads != d_model, and 8 buckets with
# max_distance 16 so that 9-12 token sequences reach the logarithmic buckets.
_T5_COMMON = {"vocab_size": 101, "d_model": 32, "d_kv": 6, "d_ff": 48, "num_layers": 2, "num_decoder_layers": 3,
              "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
              "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def t5() -> transformers.PretrainedConfig:
    # Original T5: relu feed-forward, LM head tied to `shared` with d_model**-0.5 scaling.
    return transformers.T5Config(**_T5_COMMON, feed_forward_proj="relu")


def t5_gated() -> transformers.PretrainedConfig:
    # T5 v1.1 / Flan-T5: gated-gelu, own lm_head, no output scaling.
    return transformers.T5Config(**_T5_COMMON, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def mt5() -> transformers.PretrainedConfig:
    return transformers.MT5Config(**_T5_COMMON)


def bart() -> transformers.PretrainedConfig:
    # scale_embedding on, different encoder/decoder head counts and FFN sizes.
    return transformers.BartConfig(vocab_size=101, d_model=32, encoder_layers=2, decoder_layers=3,
                                   encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=48,
                                   decoder_ffn_dim=40, max_position_embeddings=64, scale_embedding=True,
                                   dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                   decoder_start_token_id=2, forced_eos_token_id=None)


TINY_SEQ2SEQ: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "t5": t5,
    "t5-gated": t5_gated,
    "mt5": mt5,
    "bart": bart,
}


# Mixture of experts: 2-3 layers, hidden 32, 4 experts with 2 per token (GQA, head_dim 16 for Qwen3-MoE).
# Qwen3-MoE's layer 1 is dense (mlp_only_layers), its layer 2 sparse again; norm_topk_prob off.
_MOE_COMMON = {"vocab_size": 101, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "num_experts_per_tok": 2,
               "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "tie_word_embeddings": False}


def mixtral() -> transformers.PretrainedConfig:
    return transformers.MixtralConfig(**_MOE_COMMON, intermediate_size=24, num_hidden_layers=2, num_local_experts=4,
                                      sliding_window=4)


def qwen3_moe() -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(**_MOE_COMMON, intermediate_size=40, moe_intermediate_size=16, head_dim=16,
                                       num_hidden_layers=3, num_experts=4, mlp_only_layers=[1], norm_topk_prob=False,
                                       attention_bias=True)


TINY_CAUSAL["mixtral"] = mixtral
TINY_CAUSAL["qwen3_moe"] = qwen3_moe
