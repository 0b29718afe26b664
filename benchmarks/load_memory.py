"""Peak host memory of `from_pretrained`, relative to the params it builds.

    python benchmarks/load_memory.py [--hidden 768 --layers 4 --vocab 32000] [--cases f32-f32,bf16-bf16,bf16-f32]

Writes random-weight Llama checkpoints (float32 and bfloat16 safetensors) into a
temporary folder, then loads each case in a fresh Python process: imports, a warm-up load
of a tiny checkpoint (lazy imports, the JAX CPU client), then the peak-RSS counter is reset
(`/proc/self/clear_refs`) and the baseline RSS read; after `from_pretrained(folder,
param_dtype=...)` the peak (VmHWM) is read. The ratio is

    (peak RSS - baseline RSS) / bytes of the loaded params

1.0 is the floor (the params themselves live in host memory on the CPU backend); anything
above is what the loader holds besides them at its worst moment. Linux only. Prints one
JSON line per case and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {"f32-f32": ("float32", "float32"), "bf16-bf16": ("bfloat16", "bfloat16"), "bf16-f32": ("bfloat16", "float32")}


def _config(hidden: int, layers: int, vocab: int):  # -> transformers.LlamaConfig
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                    num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                                    num_key_value_heads=max(hidden // 64, 1), tie_word_embeddings=False,
                                    max_position_embeddings=128)


def write_checkpoint(folder: Path, config, dtype: str, seed: int = 0) -> int:
    """Random weights for `config` as one safetensors file of `dtype`; returns the file's bytes."""
    import ml_dtypes
    import numpy as np

    from trlax.checkpoint.writer import write_checkpoint_dir
    from trlax.models.auto import FlaxAutoModelForCausalLM

    model = FlaxAutoModelForCausalLM.model_class(config)
    rng = np.random.default_rng(seed)
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    tensors = {key: (rng.standard_normal(rule.hf_shape, np.float32) * 0.02).astype(np_dtype)
               for key, rule in model.key_table(model.abstract_params()).items()}
    config.dtype = dtype
    write_checkpoint_dir(folder, tensors, write_extra=lambda tmp: config.save_pretrained(str(tmp)))
    return (folder / "model.safetensors").stat().st_size


def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(folder: str, warmup: str, param_dtype: str) -> None:
    """Run in a fresh process: measure one load, print one JSON line."""
    import jax
    import numpy as np

    from trlax import FlaxAutoModelForCausalLM

    warm = FlaxAutoModelForCausalLM.from_pretrained(warmup, param_dtype=param_dtype)
    jax.block_until_ready(warm.params)
    del warm
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status("VmRSS")
    model = FlaxAutoModelForCausalLM.from_pretrained(folder, param_dtype=param_dtype)
    jax.block_until_ready(model.params)
    peak = _status("VmHWM")
    params = sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree_util.tree_leaves(model.params))
    print(json.dumps({"baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20, "params_mb": params / 2**20,
                      "ratio": (peak - baseline) / params}))


def measure(folder: Path, warmup: Path, param_dtype: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), str(warmup), param_dtype],
                          env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"load of {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "WARMUP", "PARAM_DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    config = _config(args.hidden, args.layers, args.vocab)
    results = {}
    with tempfile.TemporaryDirectory(prefix="trlax-load-memory-") as tmp:
        written: dict[str, Path] = {}
        for name in args.cases.split(","):
            stored, param_dtype = CASES[name]
            if stored not in written:
                written[stored] = Path(tmp, stored)
                write_checkpoint(written[stored], config, stored)
                write_checkpoint(Path(tmp, f"warmup-{stored}"), _config(64, 1, 256), stored)
            results[name] = measure(written[stored], Path(tmp, f"warmup-{stored}"), param_dtype)
            print(json.dumps({"case": name, **results[name]}), flush=True)
    print("\n| case | params (MB) | peak above baseline (MB) | ratio |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
