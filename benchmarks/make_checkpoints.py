"""Write the benchmark checkpoints: random-weight GPT-2 models saved by PyTorch, with a TRL value head.

    python benchmarks/make_checkpoints.py --out DIR [--quick]

For each size in cases.MODELS (or QUICK_MODELS): `GPT2LMHeadModel(GPT2Config(...))`
with seed 0, `save_pretrained(DIR/<size>)` (config.json + model.safetensors), then TRL's
value head (`v_head.summary.weight` [1, H], `v_head.summary.bias` [1], nn.Linear's
default init, as TRL's ValueHead) added to the same model.safetensors, as TRL's
save_pretrained writes it. Prints one result line: {size: {"path", "bytes", "config"}}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import MODELS, QUICK_MODELS  # noqa: E402
from common import emit  # noqa: E402
from env import set_env  # noqa: E402


def write_checkpoint(folder: Path, cfg: dict) -> int:
    """Save the model + value head into `folder`; returns the weight file's size in bytes."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    model.save_pretrained(str(folder))
    head = torch.nn.Linear(cfg["n_embd"], 1)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["v_head.summary.weight"] = head.weight.detach().clone()
    tensors["v_head.summary.bias"] = head.bias.detach().clone()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return weights.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_env("torch", "cpu")
    models = QUICK_MODELS if args.quick else MODELS
    out = {}
    for size, cfg in models.items():
        folder = Path(args.out) / size
        out[size] = {"path": str(folder), "bytes": write_checkpoint(folder, dict(cfg)), "config": cfg}
    emit(out)


if __name__ == "__main__":
    main()
