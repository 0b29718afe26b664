"""Shared test helpers: tiny torch models saved to folders, padded batches, comparisons."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from filelock import FileLock

PADDINGS = ("none", "right", "left")
ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(devices: int | None = None, *python_paths: str | Path, **extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: this one's (the suite's XLA flags and compilation cache,
    see conftest.py), JAX on CPU with `devices` simulated devices, the repo (and `python_paths`) importable."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices is not None:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    path = os.pathsep.join(str(p) for p in (ROOT, *python_paths, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, **extra}


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Any:
    """A session fixture's value built by one pytest-xdist worker per run and read by the others.

    `build(folder)` runs in the first worker that asks, under a file lock; its value (JSON-able)
    is stored beside the workers' temp folders, which one run's workers share, so a fixture of
    minutes of subprocesses runs once per run instead of once per worker. Without xdist it
    simply runs. A build that fails stores nothing: each worker that needs it fails on its own.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    stored = tmp_path_factory.getbasetemp().parent / f"{name}.json"
    with FileLock(f"{stored}.lock"):
        if not stored.is_file():
            stored.write_text(json.dumps(build(tmp_path_factory.mktemp(name))))
        return json.loads(stored.read_text())


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


def trl_checkpoint(family: str, folder: Path, value_head: bool = True) -> Path:
    """A tiny random PyTorch checkpoint of `family` in `folder / family` (TRL's layout with a
    value head `v_head.summary.*` unless value_head=False; tied heads left out as transformers does)."""
    import torch
    import transformers

    from tests.tiny_configs import TINY_CAUSAL

    config = TINY_CAUSAL[family]()
    torch.manual_seed(0)
    lm = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    if value_head:
        head = torch.nn.Linear(config.hidden_size, 1)
        state["v_head.summary.weight"], state["v_head.summary.bias"] = head.weight.detach(), head.bias.detach()
    return save_torch(lm, folder / family, state_dict=state)


def random_gpt2_checkpoint(folder: Path, n_embd: int, n_layer: int, dtype: Any = None) -> Path:
    """A random GPT-2 checkpoint (vocabulary 1024) written without torch; bfloat16 by default,
    as hub checkpoints often are."""
    import ml_dtypes
    import transformers

    from trlax import FlaxAutoModelForCausalLM
    from trlax.checkpoint.writer import write_checkpoint_dir

    config = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=8, vocab_size=1024, n_positions=128,
                                     bos_token_id=0, eos_token_id=1)
    cls = FlaxAutoModelForCausalLM.model_class
    rng = np.random.default_rng(0)
    tensors = {key: (rng.standard_normal(rule.hf_shape, np.float32) * 0.02).astype(dtype or ml_dtypes.bfloat16)
               for key, rule in cls(config).key_table().items()}
    write_checkpoint_dir(folder, tensors, write_extra=lambda tmp: config.save_pretrained(str(tmp)))
    return folder


def array_shapes(jaxpr: Any) -> set[tuple[int, ...]]:
    """The shapes of every value a (closed) jaxpr and the programs inside it compute."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple) else (param,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    shapes |= array_shapes(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    shapes |= array_shapes(inner)
    return shapes
