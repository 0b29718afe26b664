"""The PyTorch peer of every case: transformers 5 GPT2LMHeadModel + TRL's value head, TRL's PPO math.

The value head is what `trl.experimental.ppo.AutoModelForCausalLMWithValueHead` computes
(nn.Linear(H, 1) on `hidden_states[-1]` of a forward with output_hidden_states=True,
logits upcast to float32), written out here so the peer does not depend on TRL's
experimental module; `create_reference_model` is TRL's own where TRL is installed.
Forward and generate run under `torch.no_grad()` (as TRL's rollout does); bf16 cases
use `torch.autocast` (float32 params, bf16 compute), the same split as trlax's
`dtype=bfloat16`. On CUDA every call ends with `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import torch
from common import (
    Bench,
    CompileCounter,
    Context,
    output_sample,
    peak_rss_mb,
    ppo_inputs,
    rss_mb,
    token_ids,
    tokens_digest,
)
from safetensors import safe_open
from transformers import GPT2LMHeadModel

ADAMW = {"lr": 1e-5, "weight_decay": 1e-4}  # optax.adamw's default decay, as trlax's side
CLIPRANGE, CLIPRANGE_VALUE, VF_COEF, RATIO_THRESHOLD, GAMMA, LAM = 0.2, 0.2, 0.1, 10.0, 1.0, 0.95  # TRL's PPOConfig

_DEVICE = "cpu"


def preimport(case: Any) -> None:
    """Import TRL (for create_reference_model) before the RSS baseline, in the cases that use it."""
    if case.kind in ("reference", "memory"):
        with contextlib.suppress(ImportError):
            import trl.experimental.utils  # noqa: F401


def install_counter(counter: CompileCounter) -> None:
    """Eager PyTorch compiles nothing: the counter stays at zero."""


def init_device(device: str) -> str:
    global _DEVICE
    _DEVICE = "cuda" if device == "gpu" else "cpu"
    if _DEVICE == "cuda":
        torch.zeros(1, device="cuda")
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu ({torch.get_num_threads()} threads)"


def device_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if _DEVICE == "cuda" else None


def _sync(out: Any) -> Any:
    if _DEVICE == "cuda":
        torch.cuda.synchronize()
    return out


def _autocast(ctx: Context) -> Any:
    if ctx.case.dtype == "bfloat16":
        return torch.autocast(device_type=_DEVICE, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ValueHeadModel(torch.nn.Module):
    """TRL's AutoModelForCausalLMWithValueHead forward: (lm_logits float32, None, values [B, T])."""

    def __init__(self, lm: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.pretrained_model = lm
        self.v_head = torch.nn.Module()
        self.v_head.summary = torch.nn.Linear(weight.shape[1], 1)
        with torch.no_grad():
            self.v_head.summary.weight.copy_(weight)
            self.v_head.summary.bias.copy_(bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        summary = self.v_head.summary
        values = summary(hidden.to(summary.weight.dtype)).squeeze(-1)
        return out.logits.float(), None, values


def _load_model(model_dir: str) -> ValueHeadModel:
    """from_pretrained of the LM + the value head's two tensors, as TRL's from_pretrained reads them."""
    lm = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
    with safe_open(f"{model_dir}/model.safetensors", framework="pt") as f:
        weight, bias = f.get_tensor("v_head.summary.weight"), f.get_tensor("v_head.summary.bias")
    return ValueHeadModel(lm, weight, bias).to(_DEVICE)


def _batch(ctx: Context, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(token_ids(ctx.cfg["vocab_size"], ctx.shapes.batch, seq), dtype=torch.long, device=_DEVICE)
    return ids, torch.ones_like(ids)


# --- (a), (b), (f), (g): forward ---------------------------------------------------------------


def _forward_bench(ctx: Context, model: torch.nn.Module, call: str) -> Bench:
    ids, mask = _batch(ctx, ctx.shapes.seq)

    def run() -> Any:
        with torch.no_grad(), _autocast(ctx):
            return model(ids, mask)

    def check(out: Any) -> dict[str, Any]:
        logits, _, values = out
        return {"output_sample": output_sample(logits.float().cpu().numpy(), values.float().cpu().numpy())}

    return Bench(call=run, sync=_sync, work=ids.numel(), check=check, extra={"call": call})


def forward(ctx: Context) -> Bench:
    return _forward_bench(ctx, _load_model(ctx.model_dir).eval(), "with no_grad: model(ids, mask)")


def _create_reference_model(model: torch.nn.Module, num_shared_layers: int | None) -> tuple[torch.nn.Module, str]:
    """TRL's create_reference_model where TRL is installed, else the same rule (TRL 1.12) inline."""
    try:
        from trl.experimental.utils import create_reference_model

        return create_reference_model(model, num_shared_layers=num_shared_layers), "trl create_reference_model"
    except ImportError:
        pass
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    if num_shared_layers is not None:  # TRL: everything before "transformer.h.{N}" points at the policy's storage
        pattern = f"transformer.h.{num_shared_layers}"
        for name, param in model.named_parameters():
            if pattern in name:
                break
            param.requires_grad_(False)
            ref.get_parameter(name).data = param.data
    return ref.eval(), "TRL 1.12's create_reference_model rule (TRL not installed)"


def reference(ctx: Context) -> Bench:
    policy = _load_model(ctx.model_dir)
    ref, how = _create_reference_model(policy, None)
    bench = _forward_bench(ctx, ref, f"{how}(policy); with no_grad: ref(ids, mask)")
    bench.extra["policy_plus_ref_param_mb"] = round(_unique_param_mb(policy, ref), 1)
    return bench


# --- (c), (f), (g): generate -------------------------------------------------------------------


def generate(ctx: Context) -> Bench:
    model = _load_model(ctx.model_dir).eval()
    lm = model.pretrained_model
    if ctx.case.rollout_dtype:  # rollouts with low-precision weights: the whole model in that dtype
        lm = lm.to(getattr(torch, ctx.case.rollout_dtype))
    lm.generation_config.eos_token_id = None  # eos disabled: every row makes exactly max_new_tokens
    s = ctx.shapes
    ids, mask = _batch(ctx, s.prompt)
    kwargs: dict[str, Any] = {"max_new_tokens": s.new_tokens, "do_sample": ctx.case.sample,
                              "pad_token_id": ctx.cfg["vocab_size"] - 1}
    if ctx.case.sample:
        kwargs.update(top_k=0, top_p=0.9, temperature=1.0)

    def run() -> torch.Tensor:
        with torch.no_grad(), _autocast(ctx):
            return lm.generate(input_ids=ids, attention_mask=mask, **kwargs)

    def check(out: torch.Tensor) -> dict[str, Any]:
        new = out.shape[1] - s.prompt
        if new != s.new_tokens:
            raise RuntimeError(f"generate made {new} new tokens per row, expected {s.new_tokens}")
        return {"new_tokens_per_row": int(new), "new_tokens_digest": tokens_digest(out[:, s.prompt:].cpu().numpy())}

    return Bench(call=run, sync=_sync, work=s.batch * s.new_tokens, check=check,
                 extra={"call": f"lm.generate(ids, attention_mask, {kwargs}), eos disabled"
                                + (f", lm.to({ctx.case.rollout_dtype})" if ctx.case.rollout_dtype else ""),
                        "steps_per_call": s.new_tokens})


# --- (d), (g): PPO update (TRL v0.11 PPOTrainer's math) ----------------------------------------


def _masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (v * m).sum() / m.sum()


def _masked_whiten(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(v, m)
    var = _masked_mean((v - mean) ** 2, m) * m.sum() / (m.sum() - 1)
    return (v - mean) * torch.rsqrt(var + 1e-8)


def _logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _experience(model: ValueHeadModel, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor,
                scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's rollout with the policy as its own reference (KL 0): old logprobs/values, GAE, returns."""
    with torch.no_grad():
        logits, _, values = model(ids, mask)
        old_logprobs = _logprobs(logits[:, :-1], ids[:, 1:])
        m = response[:, 1:].float()
        values = values[:, :-1].float() * m
        last = m.shape[1] - 1 - m.flip(1).argmax(1)
        rewards = torch.zeros_like(m).scatter(1, last[:, None], scores[:, None]) * m
        gae, advantages = torch.zeros_like(scores), []
        for t in reversed(range(m.shape[1])):
            next_value = values[:, t + 1] if t + 1 < m.shape[1] else torch.zeros_like(scores)
            gae = rewards[:, t] + GAMMA * next_value - values[:, t] + GAMMA * LAM * gae
            advantages.append(gae)
        advantages = torch.stack(advantages[::-1], dim=1)
        returns = advantages + values
    return {"old_logprobs": old_logprobs, "old_values": values, "mask": m, "returns": returns,
            "advantages": _masked_whiten(advantages, m)}


def train(ctx: Context) -> Bench:
    """One PPO minibatch step: forward with grad, clipped policy + value losses, entropy stat, backward, AdamW."""
    model = _load_model(ctx.model_dir).train()
    if ctx.case.gradient_checkpointing:
        model.pretrained_model.gradient_checkpointing_enable()  # TRL's wrapper forwards it to the LM
    raw = ppo_inputs(ctx.cfg["vocab_size"], ctx.shapes.batch, ctx.shapes.seq)
    ids, mask, response = (torch.as_tensor(raw[k], dtype=torch.long, device=_DEVICE)
                           for k in ("input_ids", "attention_mask", "response_mask"))
    exp = _experience(model, ids, mask, response, torch.as_tensor(raw["scores"], device=_DEVICE))
    # fused: transformers' default optimizer (adamw_torch_fused, torch >= 2.8); the per-tensor loop is ~4x slower.
    opt = torch.optim.AdamW(model.parameters(), **ADAMW, fused=True)
    m = exp["mask"]

    def step() -> torch.Tensor:
        with _autocast(ctx):
            logits, _, vpreds = model(ids, mask)
        logits, vpreds = logits[:, :-1], vpreds[:, :-1].float()
        logprobs = _logprobs(logits, ids[:, 1:])
        old_values, returns, adv = exp["old_values"], exp["returns"], exp["advantages"]
        vclipped = torch.clamp(vpreds, old_values - CLIPRANGE_VALUE, old_values + CLIPRANGE_VALUE)
        vf_loss = 0.5 * _masked_mean(torch.max((vpreds - returns) ** 2, (vclipped - returns) ** 2), m)
        ratio = torch.exp(logprobs - exp["old_logprobs"])
        pg_loss = _masked_mean(torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIPRANGE, 1 + CLIPRANGE)), m)
        skipped = _masked_mean(ratio, m) > RATIO_THRESHOLD  # TRL skips such a batch; no host sync here
        loss = torch.where(skipped, 0.0, pg_loss + VF_COEF * vf_loss)
        with torch.no_grad():  # TRL's stats (trlax's update computes them too)
            probs = torch.softmax(logits.float(), dim=-1)
            entropy = _masked_mean(torch.logsumexp(logits.float(), -1) - (probs * logits.float()).sum(-1), m)
            approxkl = 0.5 * _masked_mean((logprobs - exp["old_logprobs"]) ** 2, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return torch.stack([loss.detach(), entropy, approxkl])

    return Bench(call=step, sync=_sync, work=1.0, check=lambda out: {"last_step_loss": float(out[0])},
                 extra={"call": "forward + TRL clipped losses + backward + torch.optim.AdamW(lr=1e-5, wd=1e-4)"})


# --- (e): load ---------------------------------------------------------------------------------


def load(ctx: Context) -> Bench:
    extra: dict[str, Any] = {"call": "GPT2LMHeadModel.from_pretrained(dir) + value head tensors"}

    def call() -> Any:
        start = time.perf_counter()
        model = _load_model(ctx.model_dir)
        _sync(None)
        extra["from_pretrained_s"] = time.perf_counter() - start
        with torch.no_grad():  # safetensors weights are memory-mapped: read each once
            for p in model.parameters():
                p.sum()
        extra["param_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        return model

    return Bench(call=call, sync=_sync, extra=extra)


# --- (h): memory -------------------------------------------------------------------------------


def _unique_param_mb(*models: torch.nn.Module | None) -> float:
    """MB of the distinct storages behind the parameters of `models` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for model in models:
        if model is None:
            continue
        for t in model.parameters():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def memory(ctx: Context) -> Bench:
    variant = ctx.case.shared_layers
    model = _load_model(ctx.model_dir)
    if variant == "lora":
        import peft
        from cases import LORA_RANK

        model.pretrained_model = peft.get_peft_model(model.pretrained_model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["c_attn"], fan_in_fan_out=True))
        ref, how = None, f"peft.get_peft_model(LoraConfig(r={LORA_RANK}, c_attn)); ref = adapter disabled (TRL)"
    else:
        shared = None if variant == "none" else ctx.cfg["n_layer"] // 2
        ref, how = _create_reference_model(model, shared)
        how = f"{how}(policy, num_shared_layers={shared})"
    _sync(None)
    held, alone = _unique_param_mb(model, ref), _unique_param_mb(model)
    return Bench(static={"value": held}, extra={
        "call": how, "policy_param_mb": round(alone, 1), "policy_plus_ref_param_mb": round(held, 1),
        "ref_extra_mb": round(held - alone, 1), "rss_above_import_mb": round(rss_mb() - ctx.rss_baseline_mb, 1),
        "peak_rss_above_import_mb": round(peak_rss_mb() - ctx.rss_baseline_mb, 1)})


CASES = {"forward": forward, "reference": reference, "generate": generate, "train": train, "load": load,
         "memory": memory}
