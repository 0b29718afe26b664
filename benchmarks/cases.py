"""The benchmark cases of issue 9 and the model sizes and shapes they run at.

One registry read by the orchestrator (what to launch), the case processes (what to
build) and the report (units, direction, roofline). Group letters follow the issue:
(a) forward, (b) reference forward, (c) generate, (d) PPO update, (e) load, (f) tiny
model overhead, (g) bf16 compute variants, (h) memory of policy + reference.
"""

from __future__ import annotations

from dataclasses import dataclass

_TINY_IDS = {"bos_token_id": 1023, "eos_token_id": 1023}  # GPT-2's 50256 lies outside a 1024 vocab
_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_dropout_prob": 0.0}

# GPT2Config kwargs. "small" = GPT2Config()'s architecture (GPT-2 small, 124.4M params);
# "tiny" = the per-call overhead probe (2 x 64, vocab 1024). Dropout 0 in both (the
# anchors' setting): every timed call then does the same deterministic work in both stacks.
MODELS: dict[str, dict[str, int | float]] = {
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024, **_NO_DROPOUT},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1024, "n_positions": 1024, **_TINY_IDS,
             **_NO_DROPOUT},
}
# --quick runs every case on a tiny stand-in for "small" (proof that the harness works, not a measurement).
QUICK_MODELS: dict[str, dict[str, int | float]] = {
    "small": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1024, "n_positions": 128, **_TINY_IDS,
              **_NO_DROPOUT},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1024, "n_positions": 128, **_TINY_IDS,
             **_NO_DROPOUT},
}


@dataclass(frozen=True)
class Shapes:
    """batch x seq for forward/train; batch, prompt + new tokens for generate."""

    batch: int = 8
    seq: int = 128
    prompt: int = 32
    new_tokens: int = 64


FULL_SHAPES = Shapes()
QUICK_SHAPES = Shapes(batch=2, seq=32, prompt=8, new_tokens=8)
LORA_RANK = 16  # policy adapter of case (h): r=16, alpha=32 on GPT-2's fused c_attn (PEFT's default target)


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    kind: forward | reference | generate | train | load | memory.
    metric: "throughput" (work / s, higher is better), "ms_per_step" (ms per decode step,
    lower), "seconds" (lower) or "mb" (lower); `unit` names it in the table.
    per_process: one measurement per process (load: peak RSS is per process), the
    orchestrator launches warm-up + repeats processes and pools them.
    """

    name: str
    group: str
    kind: str
    model: str = "small"
    dtype: str = "float32"
    sample: bool = False
    metric: str = "throughput"
    unit: str = "tok/s"
    per_process: bool = False
    shared_layers: str | None = None  # memory cases: "none" (full copy), "half", or "lora"
    rollout_dtype: str | None = None  # generate: trlax float32 model + generate(rollout_dtype=...); torch: .to(dtype)
    gradient_checkpointing: bool = False  # train: gradient_checkpointing_enable() on both sides
    description: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "throughput"

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight a decode step streams: 2 when it runs in bf16 (bf16 compute or rollout)."""
        return 2 if "bfloat16" in (self.dtype, self.rollout_dtype) else 4


CASES: tuple[Case, ...] = (
    Case("forward", "a", "forward", description="policy forward + value head, b x s tokens/s"),
    Case("reference", "b", "reference", description="reference model forward (create_reference_model), tokens/s"),
    Case("generate_greedy", "c", "generate", unit="new tok/s", description="generate greedy, prompt + new tokens"),
    Case("generate_sample", "c", "generate", sample=True, unit="new tok/s",
         description="generate sampling (temperature 1, top_k 0, top_p 0.9)"),
    Case("train_step", "d", "train", unit="steps/s", description="one PPO update (policy + value loss, AdamW)"),
    Case("train_step_remat", "d", "train", unit="steps/s", gradient_checkpointing=True,
         description="(d) with gradient_checkpointing_enable() on both sides (blocks recomputed in the backward)"),
    Case("load", "e", "load", metric="seconds", unit="s", per_process=True,
         description="from_pretrained of the value-head checkpoint (safetensors), one per process"),
    Case("tiny_forward", "f", "forward", model="tiny", description="tiny model forward: per-call overhead"),
    Case("tiny_generate_greedy", "f", "generate", model="tiny", metric="ms_per_step", unit="ms/step",
         description="tiny model generate greedy: per-decode-step overhead"),
    Case("tiny_generate_sample", "f", "generate", model="tiny", sample=True, metric="ms_per_step", unit="ms/step",
         description="tiny model generate sampling: per-decode-step overhead"),
    Case("forward_bf16", "g", "forward", dtype="bfloat16", description="(a) with bf16 compute, f32 params"),
    Case("generate_greedy_bf16", "g", "generate", dtype="bfloat16", unit="new tok/s",
         description="(c) greedy with bf16 compute"),
    Case("generate_sample_bf16", "g", "generate", dtype="bfloat16", sample=True, unit="new tok/s",
         description="(c) sampling with bf16 compute"),
    Case("generate_greedy_rollout_bf16", "g", "generate", unit="new tok/s", rollout_dtype="bfloat16",
         description="(c) greedy, float32 model, bf16 rollout: trlax generate(rollout_dtype=bfloat16) "
                     "vs torch model.to(bfloat16)"),
    Case("generate_sample_rollout_bf16", "g", "generate", sample=True, unit="new tok/s", rollout_dtype="bfloat16",
         description="(c) sampling, float32 model, bf16 rollout (as generate_greedy_rollout_bf16)"),
    Case("train_step_bf16", "g", "train", dtype="bfloat16", unit="steps/s",
         description="(d) with bf16 compute, f32 params and optimizer state"),
    Case("memory_ref_full", "h", "memory", metric="mb", unit="MB", shared_layers="none",
         description="param bytes held by policy + unshared reference"),
    Case("memory_ref_shared", "h", "memory", metric="mb", unit="MB", shared_layers="half",
         description="param bytes held by policy + reference sharing the first n_layer/2 layers"),
    Case("memory_lora", "h", "memory", metric="mb", unit="MB", shared_layers="lora",
         description=f"param bytes held by a LoRA policy (r={LORA_RANK}) + its reference (adapter off)"),
)
BY_NAME: dict[str, Case] = {case.name: case for case in CASES}


def select(spec: str | None) -> list[Case]:
    """Cases named in a comma-separated list of case names and/or group letters (None = all)."""
    if not spec:
        return list(CASES)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in BY_NAME and not any(c.group == w for c in CASES)]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {sorted(BY_NAME)}; groups: a-h")
    return [c for c in CASES if c.name in wanted or c.group in wanted]
