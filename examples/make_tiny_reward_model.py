"""Rebuild `trlax/cli/data/tiny_reward_model`: the reward model `trlax ppo` uses with no flags.

A 1-layer GPT-2 sequence classifier (num_labels=1) over the demo's character vocabulary,
trained for a minute by regression to the demo's rule: the fraction of the 12 reply
characters (after a start token and 3 consonants) that are vowels. It is a learned model,
so a policy can in principle find inputs it over-rates; `trlax ppo` also logs the exact rule.

    python examples/make_tiny_reward_model.py [OUT_DIR] [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from tqdm import tqdm

from trlax import FlaxAutoModelForSequenceClassification
from trlax.cli.demo_task import CHARS, CONSONANTS, VOWELS
from trlax.models.sequence_classification import classification_loss

REPLY = 12
OUT = Path(__file__).resolve().parent.parent / "trlax" / "cli" / "data" / "tiny_reward_model"


def config() -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=len(CHARS), n_positions=32, n_embd=8, n_layer=1, n_head=2, n_inner=16,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, num_labels=1, problem_type="regression")


def sample(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Start token + 3 consonants + 12 reply characters with a per-row vowel rate; label = vowel fraction."""
    vowels = np.array([CHARS.index(c) for c in VOWELS])
    others = np.array([i for i, c in enumerate(CHARS) if c not in VOWELS and i > 0])
    rate = rng.uniform(0, 1, (batch, 1))
    is_vowel = rng.uniform(0, 1, (batch, REPLY)) < rate
    reply = np.where(is_vowel, rng.choice(vowels, (batch, REPLY)), rng.choice(others, (batch, REPLY)))
    prompt = rng.choice([CHARS.index(c) for c in CONSONANTS], (batch, 3))
    ids = np.concatenate([np.zeros((batch, 1), np.int64), prompt, reply], axis=1).astype(np.int32)
    return ids, is_vowel.mean(axis=1).astype(np.float32)


def main(out: Path = OUT, steps: int = 3000, seed: int = 0) -> None:
    model = FlaxAutoModelForSequenceClassification.from_config(config(), seed=seed)
    tx = optax.adam(optax.cosine_decay_schedule(1e-2, steps))
    params, opt_state = model.params, tx.init(model.params)

    @jax.jit
    def update(params, opt_state, ids, labels):
        def loss_fn(p):
            logits = model.apply(p, ids, jnp.ones_like(ids)).logits
            return classification_loss(logits, labels, "regression")

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    with tqdm(range(steps), desc="training the reward model") as bar:
        for step in bar:
            params, opt_state, loss = update(params, opt_state, *sample(rng, 128))
            if step % 100 == 0 or step == steps - 1:
                bar.set_postfix(mse=f"{float(loss):.5f}")
    ids, labels = sample(np.random.default_rng(seed + 1), 1024)
    pred = np.asarray(model.apply(params, ids, np.ones_like(ids)).logits[:, 0])
    print(f"held-out: mse {np.mean((pred - labels) ** 2):.5f}, corr {np.corrcoef(pred, labels)[0, 1]:.4f}")
    model.save_pretrained(out, params=params)
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir())} bytes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=OUT, help=f"output folder (default: {OUT})")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="init and data seed (default 0)")
    args = parser.parse_args()
    main(args.out, steps=args.steps, seed=args.seed)
