"""`trlax demo`: a shortened PPO run learns, writes its log and plot; flags and errors are one clear line."""

from __future__ import annotations

import importlib.metadata
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

from tests.helpers import save_torch
from tests.tiny_configs import gpt2
from trlax.cli import main
from trlax.cli.demo import DemoConfig, PPOLoop, build_models, new_output_dir
from trlax.cli.demo_report import METRICS_FILE, PLOT_FILE, write_outputs
from trlax.cli.demo_task import CHARS, OPENERS, VOWELS, checkpoint_task, load_tokenizer, reply_mask, score_replies

STEPS = 30  # about a fifth of the default run: enough for the reward to rise clearly


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    capture = pytest.MonkeyPatch()  # capsys is per test; this captures the module's one run
    stdout = io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    try:
        assert main(["demo", "--steps", str(STEPS), "--seed", "0", "--output-dir", str(out)]) == 0
    finally:
        capture.undo()
    return out, stdout.getvalue()


@pytest.mark.slow
def test_short_run_reward_rises(short_run: tuple[Path, str]) -> None:
    out, printed = short_run
    log = json.loads((out / METRICS_FILE).read_text())
    rewards = [m["reward"] for m in log["steps"]]
    assert len(rewards) == STEPS
    start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])  # first and last 10% of the steps
    assert log["summary"]["reward_start"] == pytest.approx(start)
    assert log["summary"]["reward_end"] == pytest.approx(end)
    assert end - start > 0.15, (start, end)  # measured: 0.15 -> 0.52 (seed 0)
    # The printed summary says the same, and the reward rule is named.
    assert f"{start:.3f} over the first 3 step(s) -> {end:.3f} over the last 3" in printed
    assert "reward:    fraction of the 12 reply characters that are vowels" in printed
    assert "samples before training" in printed and "samples after training" in printed


@pytest.mark.slow
def test_short_run_outputs(short_run: tuple[Path, str]) -> None:
    out, printed = short_run
    assert sorted(p.name for p in out.iterdir()) == sorted([METRICS_FILE, PLOT_FILE])
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((out / METRICS_FILE).read_text())
    assert log["config"]["steps"] == STEPS and log["config"]["seed"] == 0
    step = log["steps"][-1]
    assert step["step"] == STEPS - 1
    for key in ("reward", "kl", "value_loss", "policy_loss", "entropy"):
        assert np.isfinite(step[key]), key
    assert step["reply_length"] == 12  # the character task has no eos: full-length replies
    assert log["steps"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before the first update
    assert log["steps"][-1]["kl"] > 0.1
    for sample in log["samples_after"]:
        assert set(sample["reply"]) <= set(CHARS) and len(sample["reply"]) == 12
        assert sample["reward"] == pytest.approx(sum(c in VOWELS for c in sample["reply"]) / 12)
    assert f"to {out}" in printed


def test_default_output_dir_is_a_new_folder(tmp_path: Path) -> None:
    first = new_output_dir(tmp_path)
    assert first.parent == tmp_path and first.name.startswith("trlax-demo-") and not first.exists()
    first.mkdir()
    second = new_output_dir(tmp_path)  # same second: a suffix keeps it new
    assert second != first and not second.exists()


def test_no_matplotlib_writes_a_note_and_no_plot(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError

    class Models:
        description, shared_layers = "m", 1
        task = type("T", (), {"description": "r"})

    history = [{"step": i, "reward": 0.1 * i, "kl": 0.0, "value_loss": 1.0} for i in range(3)]
    log = {"history": history, "samples_before": [], "samples_after": []}
    written = write_outputs(tmp_path, log, {"reward_rise": 0.2}, DemoConfig(steps=3), Models())
    assert [p.name for p in written] == [METRICS_FILE]
    assert not (tmp_path / PLOT_FILE).exists()
    assert "matplotlib is not installed, so no plot was written" in capsys.readouterr().out


def test_help_explains_the_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model PATH_OR_HUB_ID", "--steps", "--batch-size", "--seed", "--output-dir"):
        assert flag in text
    assert "vowels" in text


def test_console_script_and_python_dash_m(monkeypatch, capsys) -> None:
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["trlax"] == "trlax.cli:main"
    monkeypatch.setattr(sys, "argv", ["trlax", "demo", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("trlax", run_name="__main__")
    assert exit_info.value.code == 0 and "usage: trlax demo" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
    (["--batch-size", "-3"], "argument --batch-size: expected a positive integer"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_flags_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trlax demo: error: ") and message in err, err


def test_batch_size_too_small_one_line(capsys) -> None:
    assert main(["demo", "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert err == "trlax demo: error: --batch-size must be at least 4 (PPO whitens advantages over each of the 2 " \
                  "minibatches); got 2\n"


def test_unknown_models_one_line(tmp_path: Path, capsys) -> None:
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(weird / "model.safetensors"))
    cases = [(str(tmp_path / "missing"), "is not a folder"),
             ("nobody/no-such-model", "is not in the hub cache"),  # tests run with HF_HUB_OFFLINE=1
             (str(weird), "cannot read the config")]
    for model, message in cases:
        assert main(["demo", "--model", model, "--output-dir", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("trlax demo: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_reply_mask_and_score() -> None:
    reply = np.array([[3, 1, 3, 3], [3, 3, 3, 3], [1, 3, 3, 3]])  # eos = 1
    mask = reply_mask(reply, (1,))
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(reply_mask(reply, ()), np.ones_like(reply))
    target = np.zeros(5, np.float32)
    target[3] = 1.0
    # Rewarded tokens / max_new_tokens: stopping early at the eos never pays.
    np.testing.assert_allclose(score_replies(target, reply, mask, 4), [0.25, 1.0, 0.0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with TRL's value head (saved as TRL does) and a word-level tokenizer with 4 vowel-only tokens."""
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(gpt2())  # vocab 101, eos 1
    head = torch.nn.Linear(32, 1)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    save_torch(lm, folder, state_dict={**state, "v_head.summary.weight": head.weight.detach(),
                                       "v_head.summary.bias": head.bias.detach()})
    words = ["[UNK]", "<eos>", "a", "ou", "the", "cat", " E", "ia", *(f"w{i}" for i in range(52))]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                         eos_token="<eos>").save_pretrained(folder)
    return folder


def test_checkpoint_task_uses_the_tokenizer(checkpoint: Path, tmp_path: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    task = checkpoint_task(config, load_tokenizer(str(checkpoint), 101))
    assert np.flatnonzero(task.target).tolist() == [2, 3, 6, 7]  # "a", "ou", " E", "ia"
    assert task.eos_ids == (1,) and "made only of vowels (a, e, i, o, u), 4 of the 101 tokens" in task.description
    ids, mask = task.sample_prompts(np.random.default_rng(0), 8)
    assert ids.shape == mask.shape and (mask[:, -1] == 1).all()  # left-padded
    # Without a usable tokenizer (transformers builds an empty one from a bare folder), the rule uses ids.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((checkpoint / "config.json").read_text())
    assert load_tokenizer(str(bare), 101) is None
    fallback = checkpoint_task(config, None)
    assert np.flatnonzero(fallback.target).tolist() == list(range(0, 101, 5))
    assert "divisible by 5" in fallback.description
    prompts, _ = fallback.sample_prompts(np.random.default_rng(0), 64)
    assert prompts.shape == (64, 4) and not (prompts == 1).any()  # random ids, never the eos


def test_demo_models_from_a_checkpoint(checkpoint: Path) -> None:
    """What `trlax demo --model` trains on: the checkpoint's value head, half its layers shared, its tokenizer."""
    models = build_models(str(checkpoint), seed=0, max_new_tokens=12)
    assert models.shared_layers == 1 and not models.policy.trainable_mask["pretrained_model"]["transformer"]["wte"][
        "embedding"]
    assert models.reference.params["pretrained_model"]["transformer"]["wte"]["embedding"] is \
        models.policy.params["pretrained_model"]["transformer"]["wte"]["embedding"]
    assert "made only of vowels" in models.task.description
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    openers = {tokenizer.decode(tokenizer(text)["input_ids"]) for text in OPENERS}  # as this vocabulary spells them
    samples = PPOLoop(models, DemoConfig(batch_size=4)).samples(n=4)
    assert len(samples) == 4
    for s in samples:
        assert s["prompt"] in openers and 0.0 <= s["reward"] <= 1.0


def test_the_policy_holds_the_current_params_between_demo_steps():
    """Each PPOLoop step donates the trainable arrays; the policy held deleted ones until `run` returned, so an
    on_step callback or anything after an interrupted run failed with "Array has been deleted"."""
    from trlax.cli.demo import build_default

    models = build_default(seed=0)
    loop = PPOLoop(models, DemoConfig(steps=2, batch_size=4))
    loop.step()
    ids = np.random.RandomState(0).randint(2, 20, (2, 6))
    np.testing.assert_array_equal(models.policy(ids)[0], models.policy.apply(loop.params, ids, np.ones_like(ids))[0])
