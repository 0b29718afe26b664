"""trlax's own Flax (Linen) models: a shared skeleton and one file per architecture family.

- `spec.py`: `ArchitectureSpec`, the one place a family's facts live; `registry.py` lists the families;
- skeleton: `layers.py`, `attention.py`, `cache.py`, `stack.py`, `decoder.py` (causal LMs),
  `encoder_decoder.py` (T5, BART), `rope.py`, `outputs.py`;
- model objects: `base.py`, `causal.py`, `seq2seq.py`, `sequence_classification.py`, and the auto classes in `auto.py`;
- families: `gpt2.py`, `llama.py` (+ `gemma.py`), `opt.py`, `gpt_neo.py`, `gpt_neox.py`, `t5.py`, `bart.py`.
"""

from trlax.models.auto import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSequenceClassification,
    supported_model_types,
)

__all__ = ["FlaxAutoModelForCausalLM", "FlaxAutoModelForSeq2SeqLM", "FlaxAutoModelForSequenceClassification",
           "supported_model_types"]
