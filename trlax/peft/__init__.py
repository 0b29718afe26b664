"""LoRA in trlax: PEFT adapters in and out (`lora`), LoRA policies (`policy`), reward adapters (`reward`)."""

from trlax.peft.lora import LoraConfig

__all__ = ["LoraConfig"]
