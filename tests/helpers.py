"""Shared test helpers: tiny torch models saved to folders, padded batches, comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PADDINGS = ("none", "right", "left")


def batch(vocab_size: int, padding: str, batch_size: int = 3, seq_len: int = 9, seed: int = 0,
          low: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids [B, T] int64 and a mask [B, T] with rows padded on the given side."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(low, vocab_size, (batch_size, seq_len)).astype(np.int64)
    mask = np.ones_like(ids)
    lengths = [seq_len, seq_len - 3, seq_len - 5][:batch_size]
    for row, n in enumerate(lengths):
        if padding == "right":
            mask[row, n:] = 0
        elif padding == "left":
            mask[row, : seq_len - n] = 0
    return ids, mask


def save_torch(model: Any, folder: Path, **kwargs: Any) -> Path:
    """save_pretrained a transformers (PyTorch) model into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), **kwargs)
    return folder


def max_diff(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    """Max |a - b| over the positions where mask (broadcast over trailing dims) is 1."""
    a = np.asarray(a.detach().numpy() if hasattr(a, "detach") else a, np.float64)
    b = np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if mask is not None:
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return float(np.abs(a - b).max()) if a.size else 0.0


def torch_random_init(model: Any, seed: int = 0, std: float = 0.2) -> Any:
    """Give every float tensor random values (norm scales too), so parity tests see them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if p.ndim == 1 and "norm" in _ else 0.0))
    return model.eval()


def torch_generation_init(model: Any, seed: int = 0) -> Any:
    """Random weights that keep activations O(1): greedy outputs vary from token to token and
    top-2 logit gaps stay far above float32 noise, so a token-for-token test is meaningful."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_scale = name.endswith("weight") and ("norm" in name or "ln" in name)
                p.copy_(float(is_scale) + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()
