"""Mixture-of-experts decoders (`model_type` mixtral, qwen3_moe) in Flax Linen, with HF names.

Attention, RoPE, norms and the layer loop are the Llama family's (trlax/models/llama.py;
Qwen3-MoE adds Qwen3's q/k RMSNorm). The feed-forward of a sparse layer is a routed
mixture of SwiGLU experts, as transformers 5 computes it:

    probs = softmax(x @ router)                 # float32, [N, E]
    w, i  = top_k(probs, k)                     # k experts per token
    w     = w / sum(w)                          # Mixtral always; Qwen3-MoE if norm_topk_prob
    out   = sum_j w_j * down_i_j(act(gate_i_j(x)) * up_i_j(x))

Params follow transformers 5's modules: the router `{block}.gate` (`weight` [E, H]) and the
experts stacked, `{block}.experts.gate_up_proj` [E, H, 2I] (gate then up along the last
dim) and `{block}.experts.down_proj` [E, I, H] (kernels, i.e. torch's [E, out, in]
transposed), where `{block}` is `block_sparse_moe` for Mixtral and `mlp` for Qwen3-MoE:
the names transformers writes in checkpoints, one Linear weight per expert
(`block_sparse_moe.experts.{e}.w1|w3|w2.weight`, `mlp.experts.{e}.gate|up|down_proj.weight`;
the SPEC's `stacked_weights` map them).

The expert computation has static shapes and no loop over tokens: every token goes
through every expert and a [N, E] combine matrix (the renormalised top-k weights, zero
elsewhere) scales each expert's activation before the down projection, which sums over
experts and intermediate units in one contraction. That costs E/k times the active
FLOPs (throughput vs the dense model of the same active size: benchmarks/moe_forward.py);
in a one-off CPU measurement a sort-based `lax.ragged_dot` form was slower still.

Routing ties: `jax.lax.top_k` picks the lower expert index among equal probabilities.
PyTorch's CPU `topk` leaves the order of equal values to libstdc++'s `nth_element`
(unspecified), so the two agree whenever the k-th and (k+1)-th probabilities differ
(checked in tests/test_moe.py); on an exact tie at that boundary they may pick different
experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from trlax.checkpoint.naming import StackedWeight
from trlax.errors import UnsupportedModelError
from trlax.models.attention import Array
from trlax.models.cache import KVCache
from trlax.models.layers import HFModule, ReadsStoredParams, activation, normal_init
from trlax.models.llama import (
    LLAMA_SHARDING,
    ROTARY_BUFFERS,
    DecoderOptions,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    cache_geometry,
    check_causal,
    decoder_options,
    sliding_everywhere,
    validate_rope,
)
from trlax.models.spec import ArchitectureSpec, ParamRule, RouterOutputs, tied_lm_head

ROUTER_LOGITS = "router_logits"  # each sparse block's sown router logits, in the "intermediates" collection


@dataclass(frozen=True)
class MoeOptions:
    """The routing facts of an MoE config (derived from it as transformers' modules read them)."""

    block_name: str  # the feed-forward module's name: "block_sparse_moe" (Mixtral) or "mlp" (Qwen3-MoE)
    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top-k weights to sum to 1
    sparse: tuple[bool, ...]  # per layer: MoE (True) or a dense MLP (Qwen3-MoE's mlp_only_layers etc.)
    topk_in_compute_dtype: bool  # Qwen3-MoE casts the routing weights to the router's dtype


def moe_options(config: Any) -> MoeOptions:
    """MoeOptions for mixtral and qwen3_moe configs; raises UnsupportedModelError for other types."""
    mt, n = config.model_type, config.num_hidden_layers
    if mt == "mixtral":
        return MoeOptions("block_sparse_moe", config.num_local_experts, config.num_experts_per_tok,
                          config.intermediate_size, True, (True,) * n, False)
    if mt == "qwen3_moe":
        step, dense_only = config.decoder_sparse_step, set(config.mlp_only_layers or ())
        sparse = tuple(i not in dense_only and config.num_experts > 0 and (i + 1) % step == 0 for i in range(n))
        return MoeOptions("mlp", config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                          bool(config.norm_topk_prob), sparse, True)
    raise UnsupportedModelError(f"model_type {mt!r} is not a mixture-of-experts model trlax implements")


def moe_decoder_options(config: Any) -> DecoderOptions:
    """The attention/norm switches: Mixtral is Mistral-like, Qwen3-MoE Qwen3-like (q/k norm)."""
    check_causal(config)
    qwen = config.model_type == "qwen3_moe"
    bias = bool(getattr(config, "attention_bias", False)) if qwen else False  # Mixtral hard-codes no bias
    return decoder_options(config, qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=qwen,
                           **sliding_everywhere(config))


def route(router_logits: Array, top_k: int, normalise: bool) -> tuple[Array, Array]:
    """transformers' top-k router: softmax in float32, the k largest, optionally renormalised.

    router_logits [..., E] -> (weights [..., k] float32, expert ids [..., k] int32), largest
    first (ties: the lower expert id first).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalise:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def load_balancing_loss(router_logits: Sequence[Array], top_k: int, attention_mask: Array) -> Array:
    """transformers' `load_balancing_loss_func` (Switch Transformer, eqs. 4-6), the router aux loss.

    router_logits: one [B, T, E] (the router's dtype) per sparse layer; attention_mask [B, T] (0 = pad, not
    counted). E x sum over experts of (the fraction of top-k picks it gets) x (its mean router probability),
    both pooled over layers and real tokens -> [] float32. The picks carry no gradient, the probabilities do.
    """
    num_experts = router_logits[0].shape[-1]
    mask = attention_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
    picks = probabilities = jnp.zeros(num_experts, jnp.float32)
    for logits in router_logits:
        probs = jax.nn.softmax(logits, axis=-1)  # in the router's dtype, as transformers
        _, experts = jax.lax.top_k(probs, top_k)
        picks += jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(-2) * mask, axis=(0, 1))
        probabilities += jnp.sum(probs.astype(jnp.float32) * mask, axis=(0, 1))
    rows = len(router_logits) * jnp.sum(mask)
    return num_experts * jnp.sum((picks / rows) * (probabilities / rows))


def combine_weights(weights: Array, experts: Array, num_experts: int) -> Array:
    """The [..., E] matrix of each token's routing weight per expert (zero for unchosen experts)."""
    return jnp.einsum("...k,...ke->...e", weights, jax.nn.one_hot(experts, num_experts, dtype=weights.dtype))


class MoeRouter(ReadsStoredParams, nn.Module):
    """The router `gate`: logits = x @ weight.T, no bias, `weight` [E, H] as transformers holds it.

    Not a linear layer to LoRA (no `kernel`): PEFT cannot adapt transformers 5's router
    either (it is not an nn.Linear), so `target_modules` naming it is refused, and
    "all-linear" leaves it out, as in PEFT.
    """

    num_experts: int
    std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", normal_init(self.std), (self.num_experts, x.shape[-1]), self.param_dtype)
        return jnp.einsum("...h,eh->...e", x.astype(self.dtype), weight.astype(self.dtype))


class MoeExperts(ReadsStoredParams, nn.Module):
    """E SwiGLU experts with stacked weights: `gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, combine: Array) -> Array:
        """x [..., H], combine [..., E] (routing weight per expert) -> [..., H]."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        gate_up = self.param("gate_up_proj", normal_init(self.std), (e, h, 2 * i), self.param_dtype)
        down = self.param("down_proj", normal_init(self.std), (e, i, h), self.param_dtype)
        gate_up = jnp.einsum("...h,ehf->...ef", x.astype(self.dtype), gate_up.astype(self.dtype))
        act = activation(self.hidden_act)(gate_up[..., :i]) * gate_up[..., i:]  # [..., E, I]
        weight = combine.astype(self.dtype)[..., None]
        # Experts a token is not routed to are computed too (densely) but must add nothing: in float16 one can
        # overflow to inf, and inf * 0 would be a NaN spread to every token (transformers never runs them).
        # (masked before the product: its gradient would be 0 * inf there otherwise, NaN for the router)
        act = jnp.where(weight > 0, act, 0) * weight
        return jnp.einsum("...ei,eih->...h", act, down.astype(self.dtype))


class SparseMoeBlock(HFModule, kw_only=True):
    """Router + experts. Definition order follows PyTorch's (Mixtral: gate, experts; Qwen3-MoE:
    experts, gate), so parameter order matches `named_parameters()`."""

    moe: MoeOptions

    def setup(self) -> None:
        c, m = self.config, self.moe
        std = c.initializer_range
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        experts = MoeExperts(m.num_experts, c.hidden_size, m.intermediate_size, c.hidden_act, std, **kw)
        router = MoeRouter(m.num_experts, std, **kw)
        if c.model_type == "mixtral":
            self.gate, self.experts = router, experts
        else:
            self.experts, self.gate = experts, router

    def __call__(self, x: Array) -> Array:
        logits = self.gate(x)  # [B, T, E] compute dtype
        self.sow("intermediates", ROUTER_LOGITS, logits)  # kept only when the forward asks (`router_outputs`)
        weights, experts = route(logits, self.moe.top_k, self.moe.norm_topk_prob)
        if self.moe.topk_in_compute_dtype:
            weights = weights.astype(logits.dtype)
        return self.experts(x, combine_weights(weights, experts, self.moe.num_experts)).astype(x.dtype)


class MoeDecoderLayer(HFModule, kw_only=True):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)), ffn sparse or dense by layer."""

    options: DecoderOptions
    layer_idx: int = 0

    def setup(self) -> None:
        c, o = self.config, self.options
        moe = moe_options(c)
        kw = {"config": c, "options": o, "dtype": self.dtype, "param_dtype": self.param_dtype}
        self.self_attn = LlamaAttention(**kw, layer_idx=self.layer_idx)
        if moe.sparse[self.layer_idx]:
            ffn: nn.Module = SparseMoeBlock(config=c, moe=moe, dtype=self.dtype, param_dtype=self.param_dtype)
        else:
            ffn = LlamaMLP(**kw)  # Qwen3MoeMLP with config.intermediate_size
        setattr(self, moe.block_name, ffn)
        self.input_layernorm = self.rms_norm(c.rms_norm_eps)
        self.post_attention_layernorm = self.rms_norm(c.rms_norm_eps)

    def __call__(self, x: Array, *, masks: dict[Any, Array], rotary: tuple[Array, Array], deterministic: bool,
                 cache: KVCache | None, cache_index: Array) -> tuple[Array, KVCache | None]:
        bias = masks[self.options.window(self.layer_idx)]
        attn_out, cache = self.self_attn(self.input_layernorm(x), bias, rotary, deterministic, cache, cache_index)
        x = x + attn_out
        ffn = getattr(self, moe_options(self.config).block_name)
        return x + ffn(self.post_attention_layernorm(x)), cache


class MoeModel(LlamaModel):
    make_options: ClassVar = staticmethod(moe_decoder_options)
    layer_cls_for: ClassVar = staticmethod(lambda config: MoeDecoderLayer)


class MoeForCausalLM(LlamaForCausalLM):
    """MixtralForCausalLM / Qwen3MoeForCausalLM."""

    backbone_cls = MoeModel


def router_outputs(config: Any, intermediates: dict[str, Any], attention_mask: Array) -> RouterOutputs:
    """What transformers returns with `config.output_router_logits`: each sparse layer's router logits
    [B * T, E] (compute dtype) and the load-balancing loss over the real tokens of `attention_mask` [B, T]
    ([] float32; the LM loss adds `router_aux_loss_coef` times it). `intermediates`: the forward's sown
    collection."""
    moe = moe_options(config)
    refuse_aux_loss_without_router(config, moe)  # output_router_logits may have been set after the build
    layers = intermediates["model"]["layers"]
    logits = [layers[str(i)][moe.block_name][ROUTER_LOGITS][0] for i, sparse in enumerate(moe.sparse) if sparse]
    aux_loss = load_balancing_loss(logits, moe.top_k, attention_mask)
    return RouterOutputs(tuple(x.reshape(-1, x.shape[-1]) for x in logits), aux_loss, config.router_aux_loss_coef)


def refuse_aux_loss_without_router(config: Any, moe: MoeOptions) -> None:
    """UnsupportedModelError for `output_router_logits` on a config without a sparse layer."""
    if not any(moe.sparse):
        raise UnsupportedModelError(
            f"{config.model_type} with output_router_logits=True and no sparse layer: its load-balancing loss is "
            "0 / 0 (NaN in transformers); set output_router_logits=False")


def validate_moe(config: Any) -> None:
    """Fail at construction on MoE options trlax does not implement (UnsupportedModelError)."""
    validate_rope(config)
    moe_decoder_options(config)
    moe = moe_options(config)
    if any(moe.sparse) and not 0 < moe.top_k <= moe.num_experts:
        raise UnsupportedModelError(f"{config.model_type}: num_experts_per_tok={moe.top_k} must be in "
                                    f"[1, {moe.num_experts}] (the number of experts)")
    if getattr(config, "output_router_logits", False):
        refuse_aux_loss_without_router(config, moe)
    if getattr(config, "router_jitter_noise", 0.0):
        raise UnsupportedModelError(
            f"{config.model_type}: router_jitter_noise={config.router_jitter_noise} (random multiplicative noise on "
            "the router input in training) is not supported by trlax; set router_jitter_noise=0.0")


MOE_SHARDING: tuple[ParamRule, ...] = (
    *(rule for rule in LLAMA_SHARDING if rule[0] != r"mlp/(gate|up)_proj/bias$"),  # MoE MLPs have no biases
    (r"experts/gate_up_proj$", ("expert", "embed", "mlp")),
    (r"experts/down_proj$", ("expert", "mlp", "embed")),
    (r"(block_sparse_moe|mlp)/gate/weight$", (None, "embed")),  # the router [E, H]: tiny
)

# Checkpoints store one Linear weight per expert (as transformers 5 writes them): see `stacked_weights`.
MIXTRAL_EXPERT_KEYS = (
    (r"^(.*\.block_sparse_moe\.experts)\.gate_up_proj$", (r"\1.{e}.w1.weight", r"\1.{e}.w3.weight")),
    (r"^(.*\.block_sparse_moe\.experts)\.down_proj$", (r"\1.{e}.w2.weight",)),
)
QWEN3_MOE_EXPERT_KEYS = (
    (r"^(.*\.mlp\.experts)\.gate_up_proj$", (r"\1.{e}.gate_proj.weight", r"\1.{e}.up_proj.weight")),
    (r"^(.*\.mlp\.experts)\.down_proj$", (r"\1.{e}.down_proj.weight",)),
)


def moe_spec(model_type: str, hf_architecture: str, peft_targets: tuple[str, ...],
             stacked_weights: tuple[StackedWeight, ...], peft_fused_targets: tuple[str, ...]) -> ArchitectureSpec:
    """The SPEC of one MoE model type (they differ in names and PEFT facts only)."""
    return ArchitectureSpec(
        model_types=(model_type,), module=MoeForCausalLM, hf_architecture=hf_architecture, base_model_prefix="model",
        layer_pattern="model.layers.{layer}", cache_geometry=cache_geometry,
        sharding_rules=MOE_SHARDING, peft_targets=peft_targets, peft_fused_targets=peft_fused_targets,
        ignored_keys=ROTARY_BUFFERS,
        tied_keys=tied_lm_head("model.embed_tokens.weight"), validate=validate_moe, stacked_weights=stacked_weights,
        router_outputs=router_outputs,
        forward_config_fields=("sliding_window", "layer_types", "output_router_logits"))
