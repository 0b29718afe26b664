"""How often a low-precision rollout picks the tokens a float32 rollout picks (greedy).

    python benchmarks/rollout_agreement.py [--model small|tiny] [--checkpoint DIR] [--rollout-dtype bfloat16]
        [--batch 8] [--prompt 32] [--new 64]

Greedy `generate` twice on the same prompts: the float32 model as it is, then with
`rollout_dtype`. Prints the share of new tokens equal position by position, the share of
rows identical throughout, and the mean number of new tokens before a row's first
difference (after one, the two continuations condition on different text, so later
positions say little). With `--checkpoint` (e.g. run.py's `--model-dir` folder/small) the
weights are that checkpoint's; otherwise the benchmark config with random weights (seed 0).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import MODELS  # noqa: E402
from env import set_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--rollout-dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    set_env("trlax", "cpu")

    import jax.numpy as jnp
    import numpy as np
    import transformers

    import trlax

    if args.checkpoint:
        model: Any = trlax.FlaxAutoModelForCausalLM.from_pretrained(args.checkpoint)
    else:
        model = trlax.FlaxAutoModelForCausalLM.from_config(transformers.GPT2Config(**MODELS[args.model]), seed=0)
    vocab = model.config.vocab_size
    ids = np.random.RandomState(0).randint(0, vocab - 1, (args.batch, args.prompt))
    kwargs = {"max_new_tokens": args.new, "eos_token_id": [], "pad_token_id": vocab - 1}
    f32 = np.asarray(model.generate(ids, **kwargs).sequences)[:, args.prompt:]
    low = np.asarray(model.generate(ids, rollout_dtype=jnp.dtype(args.rollout_dtype), **kwargs).sequences)
    low = low[:, args.prompt:]
    same = f32 == low
    first = [int(np.argmin(row)) if not row.all() else args.new for row in same]
    print(f"{args.rollout_dtype} vs float32 greedy, GPT-2 {args.model} "
          f"({args.checkpoint or 'random weights, seed 0'}), batch {args.batch}, prompt {args.prompt} + {args.new}: "
          f"{same.mean():.1%} of new tokens equal; {np.mean([f == args.new for f in first]):.0%} of rows identical; "
          f"first difference after {np.mean(first):.1f} tokens on average (per row: {first})")


if __name__ == "__main__":
    main()
