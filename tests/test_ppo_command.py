"""`trlax ppo`: prompts, reward sources, resuming, and real runs (slow) whose reward rises."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from tests.helpers import array_shapes, subprocess_env
from tests.test_adapters import randomise_lora_b
from trlax.checkpoint.reader import CheckpointReader
from trlax.checkpoint.state import StateCheckpointer
from trlax.cli import build_parser, main
from trlax.cli.demo_task import tiny_gpt2_config
from trlax.cli.ppo import EMBEDDED_REWARD_MODEL, build_models, run_flags, trainer_config
from trlax.errors import CheckpointError, TrlaxError
from trlax.models import stack
from trlax.models.auto import FlaxAutoModelForCausalLM, FlaxAutoModelForSequenceClassification
from trlax.models.stack import rematerialised as remat_block
from trlax.ppo import PPOConfig
from trlax.ppo_data import PromptSet, read_prompts
from trlax.ppo_rewards import FunctionReward, Generated, ModelReward, RewardError, checked_scores, load_function
from trlax.ppo_trainer import PPOTrainer, random_settings, reply_mask, resume, train
from trlax.value_head import FlaxAutoModelForCausalLMWithValueHead

ROOT = Path(__file__).resolve().parent.parent
VOWEL_FN = "def vowels(prompts, completions):\n    return [sum(c in 'aeiou' for c in t) / 12 for t in completions]\n"


def cli_args(**kwargs) -> Namespace:
    """The parsed `trlax ppo` namespace for these flags (the rest at their defaults)."""
    argv = ["ppo"]
    for key, value in kwargs.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return build_parser().parse_args(argv)


# --- prompts and rewards --------------------------------------------------------------------
def test_prompts_from_txt_jsonl_and_datasets(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n\nworld\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "x": 1}\n')
    datasets.Dataset.from_dict({"prompt": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_prompts(tmp_path / "p.txt") == ["hello", "world"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    assert read_prompts(tmp_path / "ds") == ["x", "y", "z"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(TrlaxError, match="'prompt' field"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(TrlaxError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    # .json was read as text: '[', ' {', '  "prompt": ...' became prompts
    datasets.Dataset.from_dict({"prompt": ["c", "d"]}).to_json(str(tmp_path / "lines.json"))  # JSON lines
    (tmp_path / "array.json").write_text('[\n {"prompt": "e"},\n {"prompt": "f"}\n]\n')
    assert read_prompts(tmp_path / "lines.json") == ["c", "d"] and read_prompts(tmp_path / "array.json") == ["e", "f"]
    (tmp_path / "bad.json").write_text('["just text"]')
    with pytest.raises(TrlaxError, match=r"bad.json\[0\] has no string 'prompt' field"):
        read_prompts(tmp_path / "bad.json")
    # A Latin-1 file was an "unexpected UnicodeDecodeError ... please report it" naming no file.
    for name, text in (("latin1.txt", "café\n"), ("latin1.jsonl", '{"prompt": "café"}\n')):
        (tmp_path / name).write_bytes(text.encode("latin-1"))
        with pytest.raises(TrlaxError, match=rf"{name} is not UTF-8 text .*save it as UTF-8"):
            read_prompts(tmp_path / name)


def test_prompt_batches_are_left_padded_and_a_function_of_seed_and_step():
    class Codec:
        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    prompts = PromptSet.build(["ab", "abcd", "c", "xyz", "q"], Codec(), pad_id=0, max_length=3)
    np.testing.assert_array_equal(prompts.ids[1], [ord("b"), ord("c"), ord("d")])  # the last max_length tokens
    np.testing.assert_array_equal(prompts.mask[2], [0, 0, 1])
    assert prompts.texts == ["ab", "bcd", "c", "xyz", "q"]  # what the policy reads: the reward sources get these
    first_pass = np.concatenate([prompts.rows(7, s, 1) for s in range(5)])
    assert sorted(first_pass) == [0, 1, 2, 3, 4]  # each prompt once per pass
    np.testing.assert_array_equal(prompts.rows(7, 3, 2), prompts.rows(7, 3, 2))
    assert not np.array_equal(np.concatenate([prompts.rows(7, s, 5) for s in range(4)]),
                              np.concatenate([prompts.rows(8, s, 5) for s in range(4)]))


def test_reward_function_is_called_with_texts_and_checked(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(VOWEL_FN + "def broken(prompts, completions):\n    return [1.0]\n"
                                            "def raises(prompts, completions):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    generated = Generated(np.zeros((2, 3)), np.ones((2, 3)), ["^b", "^c"], ["aaab", "bbbbbbbbbbbb"])
    np.testing.assert_allclose(FunctionReward(load_function("my_rewards:vowels"), "v")(generated), [0.25, 0.0])
    with pytest.raises(RewardError, match="one finite number per completion"):
        FunctionReward(load_function("my_rewards:broken"), "b")(generated)
    with pytest.raises(RewardError, match="reward function r\\(prompts, completions\\) raised ZeroDivisionError"):
        FunctionReward(load_function("my_rewards:raises"), "r")(generated)  # reported as a trlax bug before
    (tmp_path / "strings.py").write_text("def high(prompts, completions):\n    return ['high'] * len(completions)\n")
    with pytest.raises(RewardError, match=r"reward function s\(prompts, completions\) returned list values that are "
                                          r"not numbers .*one finite number per completion \(2\)"):
        FunctionReward(load_function("strings:high"), "s")(generated)  # said the function raised ValueError
    with pytest.raises(RewardError, match="returned list values that are not numbers"):
        checked_scores(["0.5", "1e3"], 2, "reward function n")  # numpy would parse these strings
    with pytest.raises(RewardError, match="MODULE:FUNCTION"):
        load_function("my_rewards")
    with pytest.raises(RewardError, match="no function"):
        load_function("my_rewards:nope")


def test_reward_module_in_the_current_directory_imports_under_the_console_script(tmp_path, monkeypatch):
    """The `trlax` console script's sys.path starts with its bin folder, not the current directory."""
    (tmp_path / "rewards_in_cwd.py").write_text(VOWEL_FN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_function("rewards_in_cwd:vowels")(prompts=["p"], completions=["ae"]) == [2 / 12]


def test_bad_flag_combinations_fail_with_one_line(tmp_path, capsys):
    assert main(["ppo", "--output-dir", str(tmp_path), "--reward-adapter", "x"]) == 1
    assert main(["ppo", "--output-dir", str(tmp_path), "--reward-fn", "a:b", "--reward-model", "x"]) == 1
    assert main(["ppo", "--output-dir", str(tmp_path), "--batch-size", "6", "--mini-batch-size", "4"]) == 1
    err = capsys.readouterr().err
    assert "--lora-r" in err and "one reward source" in err and "multiple of --mini-batch-size" in err


def test_embedded_reward_model_is_small_and_scores_vowels():
    size = sum(p.stat().st_size for p in EMBEDDED_REWARD_MODEL.iterdir())
    assert size < 16_000
    models, _ = build_models(cli_args(steps=1))
    prompt = [0, 3, 4, 5]  # "^bcd"
    ids = np.array([prompt + [1] * 12, prompt + [2] * 12, prompt + [3] * 12, prompt + [2, 3] * 6])  # " ", a, b, ab
    scores = models.reward(Generated(ids, np.ones_like(ids)))
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.0, 0.5], atol=0.05)


def test_reward_model_past_its_positions_or_non_finite_raises_instead_of_nan():
    """The embedded reward model has 32 learned positions: a longer prompt + reply gave NaN scores (and NaN params
    after the step), now a RewardError naming the flags to lower; a non-finite score is refused too."""
    models, _ = build_models(cli_args(steps=1))
    ids = np.full((2, 40), 2)
    with pytest.raises(RewardError, match="has 32 positions.*40 of its tokens.*--max-prompt-length"):
        models.reward(Generated(ids, np.ones_like(ids)))
    # Positions count real tokens: a batch padded wider than the table scores as its rows do alone (it was refused).
    mask = np.zeros_like(ids)
    mask[0, 10:30], mask[1, 30:] = 1, 1
    np.testing.assert_allclose(models.reward(Generated(ids, mask)),
                               [models.reward(Generated(ids[:1, 10:30], mask[:1, 10:30]))[0],
                                models.reward(Generated(ids[1:, 30:], mask[1:, 30:]))[0]], atol=1e-6)
    reward = models.reward
    reward.model.params = jax.tree_util.tree_map(lambda x: x * np.nan, reward.model.params)
    with pytest.raises(RewardError, match="non-finite scores"):
        reward(Generated(ids[:, :8], np.ones((2, 8), int)))


def test_reward_is_read_where_trl_reads_it_when_pad_is_eos(tmp_path):
    """pad == eos (the CLI's choice for a tokenizer without a pad token): TRL's get_reward and transformers' pooling
    read the token before the eos, where TRL's reward trainer puts the score; trlax read the eos itself."""
    from trl.experimental.utils import get_reward

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64, num_labels=1,
                                     pad_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    pt = transformers.GPT2ForSequenceClassification(config).eval()
    pt.save_pretrained(tmp_path / "rm")
    reward = ModelReward(FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "rm"), None, "rm")
    pad = eos = 1
    prompt = [[pad, pad, 5, 6], [7, 8, 9, 10], [pad, 11, 12, 13]]
    replies = [[20, 21, eos, pad, pad], [22, 23, 24, 25, 26], [eos, pad, pad, pad, pad]]  # eos, none, at once
    sequences = np.array([p + r for p, r in zip(prompt, replies, strict=True)])
    reply_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mask = np.concatenate([(np.array(prompt) != pad).astype(int), reply_mask], axis=1)
    with torch.no_grad():
        _, expected, _ = get_reward(pt, torch.tensor(sequences), pad, context_length=4)
    np.testing.assert_allclose(reward(Generated(sequences, mask, pad_id=pad)), expected.numpy(), atol=1e-5)


def test_fresh_run_into_a_saved_state_is_refused_and_orbax_never_skips_a_save(tmp_path, capsys):
    """Orbax silently skips a step below the latest, so a second fresh run into the same folder kept the first run's
    state, and a later --resume continued the wrong run."""
    args = cli_args(steps=2, batch_size=2, mini_batch_size=1, max_new_tokens=4, save_every=2)  # minibatches of 1
    models, texts = build_models(args)
    prompts = PromptSet.build(texts, models.codec, models.pad_id, 16)
    train(PPOTrainer(models, prompts, trainer_config(args)), tmp_path)
    again = cli_args(steps=1, batch_size=2, mini_batch_size=2, max_new_tokens=4, save_every=1)
    with pytest.raises(TrlaxError, match="training state of an earlier run \\(step 2\\).*--resume"):
        train(PPOTrainer(models, prompts, trainer_config(again)), tmp_path)
    assert main(["ppo", "--output-dir", str(tmp_path), "--steps", "1"]) == 1
    assert "training state of an earlier run" in capsys.readouterr().err
    checkpointer = StateCheckpointer(tmp_path / "state")
    try:
        with pytest.raises(CheckpointError, match="step 1 is not after the latest saved step 2"):
            checkpointer.save(1, {"w": np.zeros(2)})
    finally:
        checkpointer.close()
    resumed = PPOTrainer(models, prompts, trainer_config(cli_args(steps=3, batch_size=4, mini_batch_size=2,
                                                                  max_new_tokens=4, save_every=2)))
    with pytest.raises(TrlaxError, match="trained with --batch-size 2, not 4"):
        resume(resumed, tmp_path)


def test_ppo_settings_trl_names_and_limits(tmp_path, capsys):
    """--target is TRL's adaptive-KL `target`; TRL's `target_kl` (early stopping) is not implemented, so
    --target-kl is refused rather than read as the other setting. A zero target or horizon is refused up front."""
    assert trainer_config(cli_args(target=3.0)).ppo.target == 3.0
    assert main(["ppo", "--output-dir", str(tmp_path / "a"), "--target-kl", "1.0"]) == 1
    assert "early-stopping threshold" in capsys.readouterr().err
    for field in ("target", "horizon"):
        with pytest.raises(TrlaxError, match=f"{field} .* must be > 0"):
            PPOConfig(**{field: 0.0})
    args = cli_args(max_new_tokens=40)  # the embedded policy has 32 positions
    models, texts = build_models(args)
    with pytest.raises(TrlaxError, match="32 positions, but a prompt of 4 tokens \\+ 40 new ones"):
        PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))



@pytest.mark.parametrize(("flags", "found"), [
    (["--learning-rate", "1e30", "--mini-batch-size", "1"], "approxkl nan, entropy nan, policy_loss nan, value_loss "
                                                           "nan, the updated params hold NaN or inf"),
    # one update per step: the losses are computed before it, so only the params show it
    (["--learning-rate", "1e39", "--mini-batch-size", "2", "--ppo-epochs", "1"], "the updated params hold NaN or inf"),
])
def test_a_diverging_run_stops_at_that_step_and_writes_no_nan(tmp_path, capsys, flags, found):
    """A run whose updates turned the params NaN went on to the end, logged NaN metrics every step and saved the
    NaN policy as its result (a save warning was the only sign)."""
    run = tmp_path / "run"
    argv = ["ppo", "--output-dir", str(run), "--steps", "3", "--batch-size", "2", "--max-new-tokens", "4", "--quiet"]
    assert main(argv + flags) == 1
    err = capsys.readouterr().err
    assert f"PPO step 1 diverged ({found}); start again with a lower learning rate" in err
    assert (run / "metrics.jsonl").read_text() == ""  # the diverged step is not logged
    assert not (run / "final").exists()


def test_hyper_parameters_that_cannot_train_are_refused_up_front(tmp_path, capsys):
    """NaN, inf or out-of-range settings trained on nonsense or diverged with advice to lower the learning rate;
    --seed -1 and --data 0 gave an 'unexpected' error at step 1 or were ignored."""
    bad = {"--learning-rate": ("nan", "inf", "0", "-1"), "--max-grad-norm": ("nan", "0"),
           "--gamma": ("nan", "1.5", "-0.1"), "--lam": ("nan", "2"), "--vf-coef": ("nan", "-1"),
           "--init-kl-coef": ("nan", "-1", "inf"), "--cliprange": ("nan", "-0.5", "0"), "--cliprange-value": ("nan",)}
    expected = {"--learning-rate": "--learning-rate must be a finite number > 0",
                "--max-grad-norm": "--max-grad-norm must be a finite number > 0", "--gamma": "gamma must be in [0, 1]",
                "--lam": "lam must be in [0, 1]", "--vf-coef": "vf_coef must be a finite number >= 0",
                "--init-kl-coef": "init_kl_coef must be a finite number >= 0",
                "--cliprange": "cliprange must be a finite number > 0",
                "--cliprange-value": "cliprange_value must be a finite number > 0"}
    for flag, values in bad.items():
        for value in values:
            assert main(["ppo", "--output-dir", str(tmp_path / "run"), flag, value]) == 1
            assert expected[flag] in capsys.readouterr().err, (flag, value)
    one_token = ["--batch-size", "1", "--mini-batch-size", "1", "--max-new-tokens", "1"]
    assert main(["ppo", "--output-dir", str(tmp_path / "run"), *one_token]) == 1
    assert "one token has no variance" in capsys.readouterr().err
    assert main(["ppo", "--output-dir", str(tmp_path / "run"), "--data", "0"]) == 1
    assert "mesh axis sizes must be >= 1" in capsys.readouterr().err
    for command in ("ppo", "demo"):
        for seed in ("-1", str(2**64)):
            assert main([command, "--output-dir", str(tmp_path / command), "--seed", seed]) == 1
            assert f"--seed must be an integer in [0, 2**32); got {seed}" in capsys.readouterr().err


def test_reward_std_is_trls_unbiased_std():
    """TRL logs torch's std (n - 1); trlax logged numpy's (n): 1.118 for scores 0..3 where TRL says 1.291."""
    args = cli_args(steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4)
    models, texts = build_models(args)
    models.reward = lambda generated: np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    trainer = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))
    assert trainer.step()["reward_std"] == pytest.approx(np.std([0.0, 1.0, 2.0, 3.0], ddof=1), rel=1e-6)


def test_the_trainer_never_holds_the_whole_batchs_logits():
    """TRL's batched_forward_pass runs the rollout's forwards in mini_batch_size chunks; trlax's trainer ran them
    over the whole batch, so --mini-batch-size did not bound a step's memory (the [B, T, V] logits did)."""
    args = cli_args(steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4)
    models, texts = build_models(args)
    trainer = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))
    prompt_mask = trainer.prompts.mask[:4]
    sequences = jnp.ones((4, prompt_mask.shape[1] + 4), jnp.int32)
    program = jax.make_jaxpr(trainer._learn)(
        trainer.trainable, trainer.frozen, trainer.opt_state, models.reference.params, sequences,
        jnp.asarray(prompt_mask), jnp.ones(4), jnp.ones(4), jnp.float32(0.1), trainer.minibatch_order(0))
    shapes = array_shapes(program.jaxpr)
    vocab, length = models.policy.config.vocab_size, sequences.shape[1] - 1
    assert (2, length, vocab) in shapes and (4, length, vocab) not in shapes


def test_an_embedded_lora_run_saves_the_base_its_adapter_names(tmp_path):
    """`--lora-r` without `--model`: final/ named no base (base_model_name_or_path None), so neither trlax nor TRL
    could load it; the embedded base is now saved in base/ and named there."""
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead

    out = tmp_path / "run"
    assert main(["ppo", "--output-dir", str(out), "--lora-r", "2", "--steps", "2", "--batch-size", "4",
                 "--mini-batch-size", "2", "--max-new-tokens", "4", "--quiet"]) == 0
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(out / "final", strict=True)
    trl = AutoModelForCausalLMWithValueHead.from_pretrained(str(out / "final")).eval()
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    logits, _, values = policy(ids)
    with torch.no_grad():
        trl_logits, _, trl_values = trl(torch.tensor(ids, dtype=torch.long))
    np.testing.assert_allclose(np.asarray(logits), trl_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(values), trl_values.numpy(), atol=1e-4)


def test_scores_of_any_reward_callable_are_checked_before_the_step():
    """A plain `Models.reward` callable returning NaN surfaced as "PPO step 1 diverged ... lower learning rate"."""
    args = cli_args(steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4)
    models, texts = build_models(args)
    prompts = PromptSet.build(texts, models.codec, models.pad_id, 16)

    def nan_scores(generated):
        return np.full(4, np.nan, np.float32)

    for reward, match in ((nan_scores, r"the reward .*nan_scores returned \(4,\) values \(finite: False\)"),
                          (lambda generated: np.ones((4, 1)), r"returned \(4, 1\) values .*one finite number per "
                                                              r"completion \(4\)")):
        models.reward = reward
        with pytest.raises(RewardError, match=match):
            PPOTrainer(models, prompts, trainer_config(args)).step()


def test_a_pad_id_outside_the_vocabulary_is_refused(tmp_path, monkeypatch, capsys):
    """A [PAD] added to the tokenizer without resizing the model: generate wrote the out-of-vocabulary pad after
    each eos, the learn step's embedding lookup gave NaN, and the run stopped blaming the learning rate."""
    lm = FlaxAutoModelForCausalLM.from_config(tiny_gpt2_config())
    with pytest.raises(TrlaxError, match="pad_token_id holds token id 999, outside the vocabulary"):
        lm.generate(np.array([[1, 2, 3]]), max_new_tokens=2, eos_token_id=1, pad_token_id=999)
    # An eos outside the vocabulary (a tiny config's default 50256) never ends a row, so pad is never emitted.
    lm.generate(np.array([[1, 2, 3]]), max_new_tokens=2, eos_token_id=50256, pad_token_id=50256)
    folder = word_checkpoint(tmp_path / "policy")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"pad_token": "[NEWPAD]"})
    tokenizer.save_pretrained(folder)
    (tmp_path / "p.txt").write_text("the cat\n")
    (tmp_path / "pad_rewards.py").write_text(VOWEL_FN)  # a reward function that loads (it is read first)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["ppo", "--model", str(folder), "--reward-fn", "pad_rewards:vowels", "--prompts",
                 str(tmp_path / "p.txt"), "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert f"the tokenizer's pad id {len(tokenizer) - 1} is outside the policy's vocabulary" in err, err


WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]


def word_tokenizer(pad: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: <unk> 0, <pad> 1, </s> 2, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>",
                                                **({"pad_token": "<pad>"} if pad else {}))


def word_checkpoint(folder: Path, classifier: bool = False, pad: bool = True, **config: Any) -> Path:
    """A tiny GPT-2 over WORDS (an LM, or a 1-label classifier) saved with its word tokenizer."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=3 + len(WORDS), n_positions=32,
                                   num_labels=1, eos_token_id=2, bos_token_id=2, **config)
    auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModelForCausalLM
    auto.from_config(gpt2).save_pretrained(folder)
    word_tokenizer(pad).save_pretrained(folder)
    (folder.parent / "prompts.txt").write_text("the cat sat\na dog ran\non a mat\nthe dog sat far\n")
    return folder


def test_reward_model_tokenizers_without_pad_and_peft_adapters_without_tokenizers(tmp_path):
    """A reward tokenizer without a pad token scored with pad id 0 (a real token, skipped at the end of a text);
    a PEFT SEQ_CLS adapter folder has no tokenizer, so its base's was ignored and the policy's ids were read."""
    policy = word_checkpoint(tmp_path / "policy")
    rm = word_checkpoint(tmp_path / "rm", classifier=True, pad=False)  # config pad None, tokenizer without pad
    args = cli_args(model=policy, reward_model=rm, prompts=tmp_path / "prompts.txt")
    models, _ = build_models(args)
    assert models.reward.pad_id is None and models.reward.needs_text
    pt = transformers.AutoModelForSequenceClassification.from_pretrained(rm).eval()
    generated = Generated(np.zeros((2, 1)), np.ones((2, 1)), ["the cat", "a dog"], [" sat <unk>", " ran"])
    with torch.no_grad():
        expected = [pt(torch.tensor([word_tokenizer()(p + c)["input_ids"]])).logits[0, 0].item()
                    for p, c in zip(generated.prompts, generated.completions, strict=True)]
    np.testing.assert_allclose(models.reward(generated), expected, atol=1e-5)
    adapter = peft.get_peft_model(pt, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["c_attn"]))
    randomise_lora_b(adapter)  # PEFT starts lora_B at zero: an adapter that changes nothing proves nothing
    adapter.save_pretrained(str(tmp_path / "adapter"))
    adapter_args = cli_args(model=policy, reward_model=tmp_path / "adapter", prompts=tmp_path / "prompts.txt")
    reward = build_models(adapter_args)[0].reward
    assert reward.needs_text  # the base folder's tokenizer
    # The scores PPO trains on are the adapted model's (they were the base's alone: the LoRA was left out).
    with torch.no_grad():
        adapted = [adapter.eval()(torch.tensor([word_tokenizer()(p + c)["input_ids"]])).logits[0, 0].item()
                   for p, c in zip(generated.prompts, generated.completions, strict=True)]
    assert max(abs(a - e) for a, e in zip(adapted, expected, strict=True)) > 1e-2
    np.testing.assert_allclose(reward(generated), adapted, atol=1e-5)


def test_replies_end_at_every_eos_of_the_generation_config(tmp_path, monkeypatch):
    """A chat checkpoint's generation_config lists several eos ids (Llama 3: <|end_of_text|>, <|eot_id|>); TRL's
    rollout (transformers' generate) stops at each, trlax ran replies on past all but the tokenizer's eos."""
    (tmp_path / "eos_rewards.py").write_text(VOWEL_FN)
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = word_checkpoint(tmp_path / "policy")
    transformers.GenerationConfig(eos_token_id=[2, 5], pad_token_id=1).save_pretrained(policy)
    models, _ = build_models(cli_args(model=policy, reward_fn="eos_rewards:vowels", prompts=tmp_path / "prompts.txt"))
    assert models.eos_ids == (2, 5) and models.pad_id == 1
    reply = np.array([[7, 5, 8, 9], [7, 2, 8, 9], [7, 8, 9, 10]])
    np.testing.assert_array_equal(reply_mask(reply, models.eos_ids), [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    plain = word_checkpoint(tmp_path / "plain")  # no generation_config.json: the tokenizer's eos alone
    plain_args = cli_args(model=plain, reward_fn="eos_rewards:vowels", prompts=tmp_path / "prompts.txt")
    assert build_models(plain_args)[0].eos_ids == (2,)


def test_a_peft_adapter_policy_without_a_tokenizer_uses_its_bases(tmp_path, monkeypatch):
    """A LoRA policy saved as an adapter folder (no tokenizer files) was refused: its base's tokenizer is the
    one, as for a PEFT reward adapter."""
    (tmp_path / "adapter_rewards.py").write_text(VOWEL_FN)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = word_checkpoint(tmp_path / "policy")
    FlaxAutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config={"r": 2, "target_modules": ["c_attn"]}
                                                          ).save_pretrained(tmp_path / "adapter")
    args = cli_args(model=tmp_path / "adapter", reward_fn="adapter_rewards:vowels", prompts=tmp_path / "prompts.txt")
    models, _ = build_models(args)
    assert models.policy.is_peft_model
    assert models.tokenizer.get_vocab() == word_tokenizer().get_vocab() and models.pad_id == 1


def test_a_run_that_cannot_start_leaves_no_folder_and_loads_nothing(tmp_path, monkeypatch, capsys):
    """Bad prompts, a missing reward or bad sampling settings were found after the policy had loaded (minutes for
    a large checkpoint), and left an empty output folder (the sampling settings a metrics.jsonl too)."""
    (tmp_path / "prompts.txt").write_text("a\nb\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(FlaxAutoModelForCausalLMWithValueHead, "from_pretrained", no_loading)
    out = tmp_path / "run"
    prompts = ["--prompts", str(tmp_path / "prompts.txt")]
    for flags, message in (
        (["--model", str(tmp_path), "--reward-fn", "m:f", "--prompts", str(tmp_path / "missing.txt")],
         "missing.txt does not exist"),
        (["--model", str(tmp_path), "--reward-fn", "m:f"], "--model needs --prompts"),
        (["--model", str(tmp_path), *prompts], "--model needs a reward"),
        (["--model", str(tmp_path), *prompts, "--reward-fn", "no_such_module_here:f"], "no_such_module_here"),
        (["--top-p", "1.5"], "top_p must be in [0, 1]"),
        (["--temperature", "0"], "temperature must be > 0"),
    ):
        assert main(["ppo", "--quiet", "--output-dir", str(out), *flags]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    monkeypatch.undo()
    assert main(["ppo", "--quiet", "--output-dir", str(out), "--model", str(tmp_path / "absent"), *prompts,
                 "--reward-fn", "m:f"]) == 1
    assert not out.exists()


def test_a_run_built_in_python_resumes_under_the_command(tmp_path, capsys):
    """Notebook 04 builds "the same run as trlax ppo" in Python; its state was refused by `trlax ppo --resume` with
    the same flags ("max_prompt_length None -> 256"): the trainer had not recorded the run flags."""
    flags = ["--batch-size", "2", "--mini-batch-size", "2", "--max-new-tokens", "4", "--save-every", "1",
             "--output-dir", str(tmp_path / "run")]
    args = build_parser().parse_args(["ppo", "--steps", "1", *flags])
    models, texts = build_models(args)
    prompts = PromptSet.build(texts, models.codec, models.pad_id, args.max_prompt_length)
    train(PPOTrainer(models, prompts, trainer_config(args), run=run_flags(args)), tmp_path / "run")
    capsys.readouterr()
    assert main(["ppo", "--steps", "2", "--resume", *flags]) == 0, capsys.readouterr().err
    assert "resumed from step 1" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()] == [2]


def test_flags_that_would_train_the_wrong_thing_are_refused(tmp_path, capsys):
    """A causal-LM checkpoint as --reward-model trained against a random head; --num-shared-layers with --lora-r was
    dropped; resuming with other model flags (here --num-shared-layers) silently reset the newly frozen layers to
    the base checkpoint's weights."""
    FlaxAutoModelForCausalLM.from_config(tiny_gpt2_config()).save_pretrained(tmp_path / "lm")
    assert main(["ppo", "--output-dir", str(tmp_path / "a"), "--reward-model", str(tmp_path / "lm")]) == 1
    assert main(["ppo", "--output-dir", str(tmp_path / "b"), "--lora-r", "4", "--num-shared-layers", "1"]) == 1
    err = capsys.readouterr().err
    assert "no trained score head" in err and "--num-shared-layers applies to a full-weight policy" in err
    args = cli_args(steps=1, batch_size=2, mini_batch_size=2, max_new_tokens=4, save_every=1)
    models, texts = build_models(args)
    prompts = PromptSet.build(texts, models.codec, models.pad_id, 16)
    train(PPOTrainer(models, prompts, trainer_config(args), run={"num_shared_layers": None}), tmp_path / "c")
    again = PPOTrainer(models, prompts, trainer_config(args), run={"num_shared_layers": 1})
    with pytest.raises(TrlaxError, match="other settings \\(num_shared_layers None -> 1\\)"):
        resume(again, tmp_path / "c")


@pytest.mark.slow
def test_mesh_flags_train_and_resume(tmp_path):
    """--fsdp/--data on 4 devices: Adam's step count (and a restored RNG key) sat on device 0 beside params on the
    mesh, and every run stopped at its first step."""
    policy = word_checkpoint(tmp_path / "policy")
    (tmp_path / "rewards.py").write_text("def words(prompts, completions):\n"
                                         "    return [len(c.split()) / 4 for c in completions]\n")
    flags = ["--model", str(policy), "--reward-fn", "rewards:words", "--prompts", str(tmp_path / "prompts.txt"),
             "--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "4", "--save-every", "1",
             "--fsdp", "2", "--data", "2", "--output-dir", str(tmp_path / "out")]
    for extra in (["--steps", "1"], ["--steps", "2", "--resume"]):
        done = run_cli([*flags, *extra], cwd=tmp_path, devices=4)
        assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2


# Three trainer steps on 4 simulated devices (data 2 x fsdp 2): which trainable params and Adam moments end up
# placed otherwise than the sharding rules placed them, and how many programs steps 2 and 3 compiled.
PLACEMENT_SCRIPT = """
import json, sys
from pathlib import Path
import jax
from tests.test_ppo_command import cli_args
from trlax.cli.ppo import build_models, trainer_config
from trlax.ppo_data import PromptSet
from trlax.ppo_trainer import PPOTrainer
folder = Path(sys.argv[1])
args = cli_args(model=folder / "policy", reward_fn="rewards:words", prompts=folder / "prompts.txt", steps=3,
                batch_size=4, mini_batch_size=2, max_new_tokens=4, fsdp=2, data=2)
models, texts = build_models(args)
trainer = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))
def specs():
    leaves = jax.tree_util.tree_flatten_with_path((trainer.trainable, trainer.opt_state))[0]
    return {jax.tree_util.keystr(path): str(leaf.sharding.spec) for path, leaf in leaves}
placed, compiles = specs(), []
trainer.step()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: compiles.append(event) if "backend_compile" in event else None)
trainer.step()
trainer.step()
print(json.dumps({"leaves": len(placed), "moved": [p for p, s in specs().items() if s != placed[p]],
                  "later_compiles": len(compiles)}))
"""


@pytest.mark.slow
def test_a_mesh_run_keeps_params_and_moments_where_the_rules_placed_them(tmp_path):
    """XLA's propagation left the learn step's updated biases and norm scales (and their Adam moments)
    fsdp-sharded where the rules replicate them (14 of 30 trainable leaves), and step 2 compiled again."""
    word_checkpoint(tmp_path / "policy")
    (tmp_path / "rewards.py").write_text("def words(prompts, completions):\n"
                                         "    return [len(c.split()) / 4 for c in completions]\n")
    done = subprocess.run([sys.executable, "-c", PLACEMENT_SCRIPT, str(tmp_path)], cwd=ROOT,
                          env=subprocess_env(4, tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["leaves"] > 20
    assert report["moved"] == []
    assert report["later_compiles"] == 0


@pytest.mark.slow
def test_resumed_trainer_matches_an_uninterrupted_one(tmp_path):
    """In process: save after step 2, a fresh trainer resumes and ends with the same bits as one that did not stop."""
    args = cli_args(steps=3, batch_size=4, mini_batch_size=2, max_new_tokens=4, save_every=2, seed=5)

    def fresh():
        models, texts = build_models(args)
        return PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))

    straight = fresh()
    train(straight, tmp_path / "a")
    interrupted = fresh()
    interrupted.config = trainer_config(cli_args(steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=4,
                                                 save_every=2, seed=5))
    train(interrupted, tmp_path / "b")
    resumed = fresh()
    assert resume(resumed, tmp_path / "b") == 2
    train(resumed, tmp_path / "b")
    for x, y in zip(jax_leaves(straight.params), jax_leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_gradient_checkpointing_trains_the_same_and_may_change_on_resume(tmp_path, capsys, monkeypatch):
    """`--gradient-checkpointing` recomputes the policy's blocks in the learn step: the same params within float32
    rounding, and, as it changes memory and not results, a run saved without it resumes with it."""
    rematerialised = []  # blocks traced under nn.remat
    monkeypatch.setattr(stack, "rematerialised", lambda *a, **k: rematerialised.append(1) or remat_block(*a, **k))
    histories = []
    for flag in (False, True):
        args = cli_args(steps=3, batch_size=4, mini_batch_size=2, max_new_tokens=4, seed=3,
                        **({"gradient_checkpointing": True} if flag else {}))
        models, texts = build_models(args)
        trainer = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))
        assert models.policy.is_gradient_checkpointing is flag
        histories.append(train(trainer, tmp_path / str(flag)))
        # Each block once in the learn step's rollout forward and once in its differentiated update.
        assert len(rematerialised) == (2 * models.policy.config.n_layer if flag else 0)
    # Metrics, not params: Adam turns the rounding noise of gradients that are 0 in exact arithmetic (the
    # attention key bias's) into updates of ~lr / 10 either way, which change no output. rtol 1e-5 (~80 float32
    # ulps): the recomputing program rounds differently, and later steps start from those updates.
    for plain, recomputed in zip(*histories, strict=True):
        for name in ("policy_loss", "value_loss", "kl", "entropy", "reward", "approxkl"):
            np.testing.assert_allclose(recomputed[name], plain[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {plain['step']} {name}")
    flags = ["--batch-size", "2", "--mini-batch-size", "2", "--max-new-tokens", "4", "--save-every", "1",
             "--output-dir", str(tmp_path / "run")]
    assert main(["ppo", "--steps", "1", "--quiet", *flags]) == 0, capsys.readouterr().err
    assert main(["ppo", "--steps", "2", "--quiet", "--resume", "--gradient-checkpointing", *flags]) == 0, \
        capsys.readouterr().err


def jax_leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# --- real runs ----------------------------------------------------------------------------------
def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 900,
            devices: int | None = None) -> subprocess.CompletedProcess:
    """`trlax ppo --quiet ARGS` as a user runs it: the console script, from `cwd` (the repo by default)."""
    trlax = Path(sys.executable).with_name("trlax")
    return subprocess.run([str(trlax), "ppo", "--quiet", *args], cwd=cwd or ROOT, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def rewards(folder: Path) -> list[float]:
    return [json.loads(line)["reward"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_rising(curve: list[float], margin: float = 0.2) -> None:
    k = max(3, len(curve) // 10)
    assert np.mean(curve[-k:]) > np.mean(curve[:k]) + margin, curve


@pytest.mark.slow
def test_no_flags_trains_the_embedded_default(tmp_path):
    result = run_cli([], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (out,) = [p for p in tmp_path.iterdir() if p.name.startswith("trlax-ppo-")]
    curve = rewards(out)
    assert len(curve) == 60
    assert_rising(curve, 0.3)
    assert (out / "final" / "model.safetensors").is_file() and (out / "ppo.png").is_file()
    with CheckpointReader([out / "final" / "model.safetensors"]) as reader:
        assert "v_head.summary.weight" in reader  # TRL's layout
    policy = transformers.AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert policy.config.model_type == "gpt2"


@pytest.mark.slow
def test_transformers_saved_reward_model(tmp_path):
    """A sequence-classification reward model saved by transformers (PyTorch) drives the run."""
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(EMBEDDED_REWARD_MODEL),
                                                                         dtype=torch.float32)
    rm.save_pretrained(str(tmp_path / "rm"))
    result = run_cli(["--reward-model", str(tmp_path / "rm"), "--steps", "20", "--output-dir", str(tmp_path / "o")])
    assert result.returncode == 0, result.stderr
    assert "reward model" in result.stdout
    assert_rising(rewards(tmp_path / "o"), 0.3)


@pytest.mark.slow
def test_reward_function(tmp_path):
    (tmp_path / "my_rewards.py").write_text(VOWEL_FN)
    result = run_cli(["--reward-fn", "my_rewards:vowels", "--steps", "20", "--output-dir", str(tmp_path / "o")],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_rising(rewards(tmp_path / "o"), 0.3)


@pytest.mark.slow
def test_sigkill_and_resume_give_bit_identical_params(tmp_path):
    flags = ["--steps", "8", "--batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens", "6",
             "--save-every", "2", "--seed", "3"]
    assert run_cli([*flags, "--output-dir", str(tmp_path / "straight")]).returncode == 0
    out = tmp_path / "killed"
    env = subprocess_env()
    for kill_at in (1, 4, 7):  # before the first save, between saves, after the last but one
        cmd = [str(Path(sys.executable).with_name("trlax")), "ppo", "--quiet", *flags, "--output-dir", str(out),
               "--resume"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}"
    assert run_cli([*flags, "--output-dir", str(out), "--resume"]).returncode == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    with CheckpointReader([tmp_path / "straight" / "final" / "model.safetensors"]) as a, \
            CheckpointReader([out / "final" / "model.safetensors"]) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in sorted(a.keys()):
            np.testing.assert_array_equal(a.get(key), b.get(key), err_msg=key)


def test_a_batch_of_one_is_refused_where_a_reply_can_end_at_once(tmp_path):
    """With eos ids, a batch of one reply that is eos at its first token has one reply token, whose whitened
    advantage is NaN: a run died tens of steps in with "diverged ... lower learning rate". Refused up front."""
    policy = word_checkpoint(tmp_path / "policy")
    (tmp_path / "one_rewards.py").write_text(VOWEL_FN)
    sys.path.insert(0, str(tmp_path))
    try:
        args = cli_args(model=policy, reward_fn="one_rewards:vowels", prompts=tmp_path / "prompts.txt",
                        batch_size=1, mini_batch_size=1)
        models, texts = build_models(args)
    finally:
        sys.path.remove(str(tmp_path))
    prompts = PromptSet.build(texts, models.codec, models.pad_id, 16)
    with pytest.raises(TrlaxError, match=r"--batch-size 1 with a policy whose replies end at eos \[2\].*size 2"):
        PPOTrainer(models, prompts, trainer_config(args))
    embedded = cli_args(steps=1, batch_size=1, mini_batch_size=1, max_new_tokens=2)  # no eos: every reply is 2 long
    models, texts = build_models(embedded)
    train(PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(embedded)),
          tmp_path / "run")


def test_the_policy_holds_the_current_params_between_steps_and_after_an_interruption(tmp_path):
    """Each step donates the trainable arrays: the policy held deleted ones from the first step until `train`
    returned, so an on_step callback, the reward, or anything after an interrupted run failed with "Array has been
    deleted", and a new trainer on the same models could not start."""
    args = cli_args(steps=3, batch_size=2, mini_batch_size=2, max_new_tokens=4)
    models, texts = build_models(args)
    prompts = PromptSet.build(texts, models.codec, models.pad_id, 16)
    scores = models.reward
    calls = []

    def reward(generated: Generated) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return scores(generated)

    models.reward = reward
    trainer = PPOTrainer(models, prompts, trainer_config(args))
    ids = np.array([[3, 4, 5]])
    seen = []
    with pytest.raises(KeyboardInterrupt):
        train(trainer, tmp_path, on_step=lambda _: seen.append(np.asarray(models.policy(ids)[0])))
    assert len(seen) == 1 and np.isfinite(seen[0]).all()
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(models.policy.params))
    np.testing.assert_array_equal(models.policy(ids)[0], seen[0])  # the first step's params
    models.policy.save_pretrained(tmp_path / "saved")
    models.reward = scores
    again = PPOTrainer(models, prompts, trainer_config(cli_args(steps=1, batch_size=2, mini_batch_size=2,
                                                                max_new_tokens=4)))
    assert len(train(again, tmp_path / "again")) == 1


def test_a_non_finite_reward_adapter_score_is_a_reward_error(tmp_path):
    """A reward adapter's inf score went into the step, which then 'diverged' blaming the learning rate; the reward
    model and reward function sources already raised RewardError for theirs."""
    from safetensors.torch import load_file, save_file

    from tests.test_reward_adapter import reward_adapter

    base = word_checkpoint(tmp_path / "base")
    reward_adapter(base, tmp_path / "rm", num_labels=1)
    weights = tmp_path / "rm" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[next(k for k in tensors if "score" in k)][0, 0] = float("inf")
    save_file(tensors, str(weights))
    args = cli_args(model=base, lora_r=2, reward_adapter=tmp_path / "rm", prompts=tmp_path / "prompts.txt")
    models, _ = build_models(args)
    ids = np.array([[3, 4, 5, 6]])
    with pytest.raises(RewardError, match="reward adapter .* returned non-finite scores"):
        models.reward(Generated(ids, np.ones_like(ids), pad_id=models.pad_id))


def test_a_metrics_line_cut_short_by_a_crash_does_not_block_resume(tmp_path, caplog):
    """A run killed while appending a metrics line left a partial JSON line, and every --resume then failed with
    "unexpected JSONDecodeError"; the cut line is dropped (with a warning), the complete ones kept."""
    from trlax.ppo_log import METRICS_FILE, MetricsLog

    lines = [json.dumps({"step": 1, "reward": 0.5}), json.dumps({"step": 2, "reward": 0.6}), '{"step": 3, "rew']
    (tmp_path / METRICS_FILE).write_text("\n".join(lines))
    with caplog.at_level("WARNING", logger="trlax"):
        log = MetricsLog(tmp_path, start_step=2)
    log.close()
    assert [m["step"] for m in log.history()] == [1, 2]
    assert "dropped a metrics line" in caplog.text
    assert not list(tmp_path.glob(".*"))  # the rewrite's temporary file is gone


def test_resuming_a_state_past_the_steps_asked_for_is_refused(tmp_path):
    """`--steps 1 --resume` over a state saved at step 2 reported "resumed from step 2", exited 0 and wrote step 2's
    policy as the final one: a run asked for fewer steps than it holds is refused."""
    args = cli_args(steps=2, batch_size=2, mini_batch_size=2, max_new_tokens=4, save_every=2)
    models, texts = build_models(args)
    prompts = PromptSet.build(texts, models.codec, models.pad_id, 16)
    train(PPOTrainer(models, prompts, trainer_config(args)), tmp_path)
    fewer = cli_args(steps=1, batch_size=2, mini_batch_size=2, max_new_tokens=4, save_every=2)
    with pytest.raises(TrlaxError, match=r"at step 2, past --steps 1; resume with --steps 2 or more"):
        resume(PPOTrainer(models, prompts, trainer_config(fewer)), tmp_path)
    same = PPOTrainer(models, prompts, trainer_config(args))
    assert resume(same, tmp_path) == 2 and train(same, tmp_path) == []


def test_score_scaling_trains_on_scaled_scores_and_resumes_with_its_moments(tmp_path):
    """TRL's use_score_scaling / use_score_norm / score_clip were not implemented. With scaling and norm, a reward
    scaled and shifted gives the step the same scores and trains the same params; without, it does not. The
    running moments are saved with the state and restored on resume."""
    flags = {"steps": 1, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 4, "save_every": 1}
    scaled = cli_args(**flags, use_score_scaling=True, use_score_norm=True, score_clip=1.5)
    config = trainer_config(scaled).ppo
    assert (config.use_score_scaling, config.use_score_norm, config.score_clip) == (True, True, 1.5)

    def first_step(args, affine):
        models, texts = build_models(args)
        base = models.reward
        models.reward = lambda generated: base(generated) * affine[0] + affine[1]
        trainer = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))
        learn, trained = trainer.learn, []
        trainer.learn = lambda *inputs: (trained.append(np.asarray(inputs[7])), learn(*inputs))[1]  # trained_scores
        metrics = train(trainer, tmp_path / f"run{len(list(tmp_path.iterdir()))}")[0]
        return trainer, metrics, trained[0]

    plain, plain_metrics, plain_scores = first_step(scaled, (1.0, 0.0))
    moved, _, moved_scores = first_step(scaled, (10.0, 3.0))
    assert abs(plain_metrics["trained_reward"]) < 1e-6  # normalised by the first batch alone: mean 0
    assert moved.score_moments.count == 4 and moved.score_moments.mean == pytest.approx(
        plain.score_moments.mean * 10 + 3, rel=1e-6)
    # 10 x + 3 rounds at float32's spacing of the moved scores, then divides by their std
    rounding = 4 * np.spacing(np.float32(3 + 10 * np.abs(plain_scores).max())) / moved.score_moments.std
    np.testing.assert_allclose(moved_scores, plain_scores, rtol=0, atol=rounding)
    # Adam moves a param by about the learning rate per update whatever the gradient's size, so the
    # scores' rounding shows in params with near-zero gradients, far below one update; other scores move them more.
    step = trainer_config(scaled).learning_rate
    assert largest_difference(plain.params, moved.params) < 0.1 * step
    unscaled = cli_args(**flags)
    first, first_metrics, _ = first_step(unscaled, (1.0, 0.0))
    second, _, _ = first_step(unscaled, (10.0, 3.0))
    assert "trained_reward" not in first_metrics and largest_difference(first.params, second.params) > step
    models, texts = build_models(scaled)
    again = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16),
                       trainer_config(cli_args(**{**flags, "steps": 2}, use_score_scaling=True, use_score_norm=True,
                                               score_clip=1.5)))
    assert resume(again, tmp_path / "run0") == 1 and again.score_moments == plain.score_moments


def largest_difference(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax_leaves(a), jax_leaves(b), strict=True))


def test_score_flags_that_cannot_work_are_refused_and_old_states_resume(tmp_path, capsys):
    """--use-score-norm alone (TRL ignores it), a bad --score-clip and --use-score-scaling with --batch-size 1 are
    refused up front. A state saved before trlax had these settings resumes: they were off there."""
    out = ["--output-dir", str(tmp_path / "run")]
    for flags, message in ((["--use-score-norm"], "use_score_norm applies only with use_score_scaling=True"),
                           (["--score-clip", "0"], "score_clip must be a finite number > 0"),
                           (["--use-score-scaling", "--batch-size", "1", "--mini-batch-size", "1"],
                            "--batch-size 1 with --use-score-scaling")):
        assert main(["ppo", *out, *flags]) == 1
        assert message in capsys.readouterr().err, flags
    assert trainer_config(cli_args(kl_penalty="abs", whiten_rewards=True)).ppo.kl_penalty == "abs"
    args = cli_args(steps=1, batch_size=2, mini_batch_size=2, max_new_tokens=4)
    models, texts = build_models(args)
    trainer = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))
    older = json.loads(json.dumps(trainer.run_settings))
    for name in ("use_score_scaling", "use_score_norm", "score_clip"):
        del older["ppo"][name]
    extra = {"seed": 0, "data_position": 2, "run": older}
    trainer.check_settings(extra, 1, tmp_path)
    older["ppo"]["use_score_scaling"] = True
    with pytest.raises(TrlaxError, match="other settings \\(ppo.use_score_scaling True -> False\\); resume"):
        trainer.check_settings(extra, 1, tmp_path)


def test_a_resume_under_other_jax_random_settings_is_refused(tmp_path):
    """A state saved under JAX_DEFAULT_PRNG_IMPL=rbg resumed under the default without a word: the embedded
    policy's and reference's random init and the samples changed (final params 0.01 off an uninterrupted run)."""
    args = cli_args(steps=1, batch_size=2, mini_batch_size=2, max_new_tokens=4)
    models, texts = build_models(args)
    trainer = PPOTrainer(models, PromptSet.build(texts, models.codec, models.pad_id, 16), trainer_config(args))
    extra = {"seed": 0, "data_position": 2, "run": trainer.run_settings, "random": random_settings()}
    trainer.check_settings(extra, 1, tmp_path)
    trainer.check_settings({k: v for k, v in extra.items() if k != "random"}, 1, tmp_path)  # saved before: allowed
    for changed in ({"prng_impl": "rbg"}, {"threefry_partitionable": not random_settings()["threefry_partitionable"]}):
        with pytest.raises(TrlaxError, match="trained with JAX's random settings.*JAX_DEFAULT_PRNG_IMPL"):
            trainer.check_settings({**extra, "random": {**random_settings(), **changed}}, 1, tmp_path)

