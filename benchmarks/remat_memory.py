"""Where gradient checkpointing's memory goes: JAX's saved residuals vs the compiled program's buffers.

For a GPT-2-shaped LM (float32, dropout 0), the gradient of a loss over the final hidden state
is traced with `gradient_checkpointing_enable()` off and on. Prints, for each: the bytes of the
residuals JAX saves for the backward pass (`jax.ad_checkpoint.print_saved_residuals`: what remat
changes at the program level) and the compiled program's temporary buffers (XLA's
`memory_analysis()`: what the backend actually allocates), and the optimization barriers
remat leaves in the lowered and in the compiled program. Each process's peak RSS is measured
by `benchmarks/run.py --cases train_step,train_step_remat` instead (side by side with PyTorch).

    python benchmarks/remat_memory.py [--layers 12 --hidden 768 --heads 12 --vocab 50257 --batch 8 --seq 128]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.ad_checkpoint import print_saved_residuals

from trlax import FlaxAutoModelForCausalLM

ITEM_BYTES = {"f64": 8, "i64": 8, "u64": 8, "f32": 4, "i32": 4, "u32": 4, "bf16": 2, "f16": 2, "i8": 1, "u8": 1,
              "bool": 1}


def residual_bytes(fn: object, *args: object) -> int:
    """Bytes of the residuals `jax.grad(fn)` saves for its backward pass, as JAX lists them, read from
    `jax.ad_checkpoint.print_saved_residuals` (lines such as "f32[8,128,768] from ...")."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(fn, *args)
    total = 0
    for dtype, dims in re.findall(r"^(\w+)\[([\d,]*)\]", printed.getvalue(), flags=re.M):
        total += ITEM_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("layers", 12), ("hidden", 768), ("heads", 12), ("vocab", 50257), ("batch", 8),
                          ("seq", 128)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                                     vocab_size=args.vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = FlaxAutoModelForCausalLM.from_config(config)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq)), jnp.int32)

    def loss(params: dict) -> jax.Array:
        return jnp.mean(model.apply(params, ids, jnp.ones_like(ids)).last_hidden_state ** 2)

    print(f"jax {jax.__version__} on {jax.default_backend()}; GPT-2 {args.layers} x {args.hidden}, "
          f"batch {args.batch} x {args.seq}, float32")
    for enabled in (False, True):
        (model.gradient_checkpointing_enable if enabled else model.gradient_checkpointing_disable)()
        lowered = jax.jit(jax.grad(loss)).lower(model.params)
        compiled = lowered.compile()
        print(f"gradient checkpointing {'on ' if enabled else 'off'}: saved residuals "
              f"{residual_bytes(loss, model.params) / 2**20:8.1f} MiB, compiled temp buffers "
              f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:8.1f} MiB, optimization barriers "
              f"{lowered.as_text().count('optimization_barrier')} lowered / "
              f"{compiled.as_text().count('opt-barrier')} compiled")


if __name__ == "__main__":
    main()
