"""Orbax training-state checkpoints: round trip, keep-last-K, async, other mesh, crash mid-save.

The multi-device checks run this file as a script in subprocesses with simulated CPU
devices (`python tests/test_state.py save8|restore4 DIR`), so the rest of the suite keeps
its single device.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from tests.helpers import subprocess_env
from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead
from trlax.checkpoint import StateCheckpointer, restore_state, save_state, wait_until_finished
from trlax.checkpoint.state import interrupts_held
from trlax.errors import CheckpointError, InputError, TrlaxError, TrlaxTypeError
from trlax.sharding import path_str

OPT = optax.adam(1e-2)


def _config() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)


def _adapters() -> dict:
    lora = {"lora_A": jnp.full((32, 4), 0.5), "lora_B": jnp.arange(4 * 96, dtype=jnp.float32).reshape(4, 96),
            "scaling": jnp.float32(2.0)}
    return {"transformer": {"h": {"0": {"attn": {"c_attn": lora}}}}}


@jax.jit
def _adam_step(params: dict) -> tuple[dict, optax.OptState]:
    """One Adam update with made-up gradients, so the moments are non-zero."""
    opt_state = OPT.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p) + 0.1, params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _small_state(seed: int = 0) -> tuple[dict, optax.OptState]:
    key = jax.random.key(seed)
    params = {"pretrained_model": {"wte": {"embedding": jax.random.normal(key, (11, 8))}},
              "v_head": {"summary": {"kernel": jnp.ones((8, 1)), "bias": jnp.full((1,), 0.5)}}}
    return _adam_step(params)


def _train_state(seed: int = 0) -> tuple[dict, optax.OptState, dict]:
    """A GPT-2 value-head model's params, an Adam state after one update, a LoRA adapter."""
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        FlaxAutoModelForCausalLM.from_config(_config(), seed=seed), seed=seed)
    return (*_adam_step(model.params), _adapters())


def _flat(tree: object) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same(a: object, b: object) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


# --- single device ---------------------------------------------------------------------------


def test_round_trip_keeps_last_k(tmp_path: Path) -> None:
    params, opt_state = _small_state()
    adapters = _adapters()
    rng = jax.random.key(7)
    for step in range(1, 4):
        checkpointer = save_state(tmp_path, step, params, opt_state, rng=rng, adapters=adapters,
                                  extra={"lr": 1e-2, "step": step}, max_to_keep=2)
    checkpointer.wait_until_finished()
    assert StateCheckpointer(tmp_path, read_only=True).all_steps() == [2, 3]
    target = {"params": params, "opt_state": jax.eval_shape(OPT.init, params)}
    restored = restore_state(tmp_path, target=target)
    assert restored.step == 3 and restored.extra == {"lr": 1e-2, "step": 3}
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)  # optax's types back, via target
    _assert_same(restored.params, params)
    _assert_same(restored.opt_state, opt_state)
    _assert_same(restored.adapters, adapters)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
    older = restore_state(tmp_path, step=2)  # no target: nested dicts/lists, same values
    assert older.step == 2
    _assert_same(older.params, params)


def test_async_save_then_restore(tmp_path: Path) -> None:
    params, opt_state = _small_state(seed=1)
    checkpointer = save_state(tmp_path, 0, params, opt_state, rng=jax.random.PRNGKey(3), async_save=True)
    checkpointer.save(1, jax.tree_util.tree_map(lambda p: p + 1, params))  # waits for step 0 first
    checkpointer.wait_until_finished()
    restored = restore_state(tmp_path, step=0)
    _assert_same(restored.params, params)
    np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(3))  # a raw uint32 key stays raw
    latest = restore_state(tmp_path)
    assert latest.step == 1 and latest.opt_state is None and latest.rng is None
    _assert_same(latest.params, jax.tree_util.tree_map(lambda p: p + 1, params))


def test_a_crashed_saves_temporary_folder_is_removed_when_a_writer_opens(tmp_path: Path) -> None:
    """Removed before the writer returns, not by Orbax's background clean-up, whose thread a quick exit (a run
    refused at once) left running into interpreter shutdown: 50 lines of tracebacks after the one-line error."""
    params, _ = _small_state()
    save_state(tmp_path, 1, params).close()
    crashed = tmp_path / "2.orbax-checkpoint-tmp-1700000000000"
    (crashed / "state").mkdir(parents=True)
    checkpointer = StateCheckpointer(tmp_path)
    try:
        assert not crashed.exists() and checkpointer.all_steps() == [1]
    finally:
        checkpointer.close()


def test_ctrl_c_during_a_save_lets_the_save_finish_then_interrupts() -> None:
    """An interrupted Orbax save left its writer threads running into interpreter shutdown (hundreds of lines of
    tracebacks after "interrupted"); the save now finishes first, and a second Ctrl-C stops at once."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a plain `python` process
    try:
        finished = False
        with pytest.raises(KeyboardInterrupt), interrupts_held("a test save"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrives while the block runs
            finished = True
        assert finished and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt), interrupts_held("a test save"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished = False  # not reached: the second Ctrl-C raised
        assert finished

        def own(signum, frame):
            pass

        with interrupts_held("a test save"):  # a handler the block installs is the block's to keep
            signal.signal(signal.SIGINT, own)
        assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_state_save_is_held_until_the_step_is_saved(tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        checkpointer = StateCheckpointer(tmp_path)
        orbax_save = checkpointer.manager.save

        def interrupted_save(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the Ctrl-C arrives while Orbax writes
            return orbax_save(*args, **kwargs)

        checkpointer.manager.save = interrupted_save
        with pytest.raises(KeyboardInterrupt):
            checkpointer.save(1, _small_state()[0])
        checkpointer.close()
        assert restore_state(tmp_path).step == 1
    finally:
        signal.signal(signal.SIGINT, previous)


def test_non_finite_arrays_are_saved_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params, opt_state = _small_state()
    with caplog.at_level(logging.WARNING, logger="trlax"):
        save_state(tmp_path, 1, params, opt_state, rng=jax.random.key(0)).close()
    assert "NaN" not in caplog.text
    bad = {**params, "v_head": {**params["v_head"], "bias": jnp.array([jnp.inf])}}
    embedding = params["pretrained_model"]["wte"]["embedding"]
    bad["pretrained_model"] = {"wte": {"embedding": embedding.at[2, 3].set(jnp.nan)}}
    with caplog.at_level(logging.WARNING, logger="trlax"):
        save_state(tmp_path, 2, bad, opt_state).close()
    assert ("step 2: 2 saved array(s) hold NaN or inf values, e.g. [\"['params']['pretrained_model']['wte']"
            "['embedding']\", \"['params']['v_head']['bias']\"]; saved as they are") in caplog.text
    restored = restore_state(tmp_path)
    assert np.isnan(restored.params["pretrained_model"]["wte"]["embedding"][2, 3])


def test_state_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory of saved training states"):
        restore_state(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no saved training state"):
        restore_state(tmp_path / "empty")
    params = {"w": jnp.ones((2, 2))}
    save_state(tmp_path / "run", 5, params)
    with pytest.raises(CheckpointError, match="step 5 is already saved"):
        save_state(tmp_path / "run", 5, params)
    with pytest.raises(CheckpointError, match="step 4 is not after the latest saved step 5"):  # Orbax skipped it
        save_state(tmp_path / "run", 4, params)
    with pytest.raises(TrlaxError, match="step must be an int"):
        save_state(tmp_path / "run", True, params)
    with pytest.raises(TrlaxTypeError, match="extra must hold JSON values"):  # before any array is written
        save_state(tmp_path / "run", 6, params, extra={"lr": jnp.float32(1e-3)})
    assert not (tmp_path / "run" / "6").exists() and not list((tmp_path / "run").glob("*tmp*"))
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        StateCheckpointer(tmp_path / "file")
    with pytest.raises(CheckpointError, match="step 6 is not saved"):
        restore_state(tmp_path / "run", step=6)
    with pytest.raises(CheckpointError, match="step 6 is not saved"):
        StateCheckpointer(tmp_path / "run", read_only=True).extra(6)
    with pytest.raises(CheckpointError, match="has no \\['opt_state'\\]"):
        restore_state(tmp_path / "run", target={"opt_state": {}})
    with pytest.raises(ValueError, match="unknown item"):
        restore_state(tmp_path / "run", target={"optimizer": {}})
    with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
        StateCheckpointer(tmp_path / "x", max_to_keep=0)


def test_states_that_cannot_be_restored_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """extra=[1, 2] saved a step that raised a raw TypeError on every restore; params without arrays saved an empty
    step that pushed a real one out of max_to_keep; a string leaf left a temporary folder behind a raw Orbax error;
    {"a.b": x, "a": {"b": y}} restored both as y; donated arrays and rng=0 raised raw errors."""
    params = {"w": jnp.arange(4.0)}
    save_state(tmp_path / "run", 1, params, max_to_keep=2)
    deleted = {"w": jnp.ones(3)}
    jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x + 1, p), donate_argnums=0)(deleted)
    for kwargs, error, match in (
            ({"params": params, "extra": [1, 2]}, TrlaxTypeError, "extra must be a dict"),
            ({"params": {"w": None}}, TrlaxError, "params hold no arrays"),
            ({"params": {}}, TrlaxError, "params hold no arrays"),
            ({"params": {"w": "text"}}, TrlaxTypeError, "params.w is a str: a training state holds arrays"),
            ({"params": {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}}, TrlaxError, "both named params.a.b"),
            ({"params": deleted}, InputError, "deleted arrays"),
            ({"params": params, "rng": 0}, TrlaxTypeError, "rng must be a jax.random key")):
        with pytest.raises(error, match=match):
            save_state(tmp_path / "run", 2, max_to_keep=2, **kwargs)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == ["1"]
    np.testing.assert_array_equal(restore_state(tmp_path / "run").params["w"], np.arange(4.0))


def test_typed_random_keys_inside_the_state_save_and_restore(tmp_path: Path) -> None:
    """optax.noisy_sgd's state holds a typed key: the unrestorable-state check must let keys through, and a target
    holding the typed key fits the raw key data Orbax stores."""
    params = {"w": jnp.arange(4.0)}
    tx = optax.noisy_sgd(1e-2)
    save_state(tmp_path / "run", 1, params, tx.init(params), adapters={"rng": jax.random.key(3)})
    restored = restore_state(tmp_path / "run", target={"opt_state": tx.init(params)})
    key = restored.opt_state[0].rng_key
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(tx.init(params)[0].rng_key))


def test_a_target_that_does_not_fit_is_named_and_not_blamed_on_the_files(tmp_path: Path) -> None:
    """A wrong target was reported as damaged files, with advice to delete the (good) step; an int target
    silently truncated the float params."""
    save_state(tmp_path / "run", 1, {"w": jnp.arange(4.0)})
    for target, match in (({"params": {"w": jnp.zeros(4, jnp.int32)}}, r"only in the target: \[\(\(4,\), 'int"),
                          ({"params": {"w": jnp.zeros(5)}}, "does not fit step 1"),
                          ({"params": {"w": jnp.zeros(4), "b": jnp.zeros(1)}}, "2 leaves against the step's 1")):
        with pytest.raises(CheckpointError, match=match) as raised:
            restore_state(tmp_path / "run", target=target)
        assert "remove" not in str(raised.value)
    with pytest.raises(TrlaxTypeError, match="target must be a dict"):
        restore_state(tmp_path / "run", target=[{"w": jnp.zeros(4)}])
    with pytest.raises(TrlaxTypeError, match="target_sharding must be a Mesh, a Sharding"):
        restore_state(tmp_path / "run", target_sharding="cpu")
    restored = restore_state(tmp_path / "run", target={"params": {"w": jnp.zeros(4, jnp.bfloat16)}})  # a cast
    assert restored.params["w"].dtype == jnp.bfloat16


def test_a_damaged_step_is_a_checkpoint_error_that_says_how_to_go_back(tmp_path: Path) -> None:
    """A committed step that lost its meta file: `extra()` (what `trlax ppo --resume` reads first) raised Orbax's
    bare FileNotFoundError; removing the step's folder resumes from the step before, as the error now says."""
    params = {"w": jnp.ones((2, 2))}
    save_state(tmp_path / "run", 1, params, extra={"at": 1})
    save_state(tmp_path / "run", 2, {"w": jnp.zeros((2, 2))}, extra={"at": 2})
    wait_until_finished(tmp_path / "run")
    (tmp_path / "run" / "2" / "meta" / "metadata").unlink()
    reader = StateCheckpointer(tmp_path / "run", read_only=True)
    hint = f"remove {tmp_path / 'run' / '2'} to resume from the step before it"
    for read in (reader.extra, lambda: restore_state(tmp_path / "run")):
        with pytest.raises(CheckpointError, match=f"step 2 in .* cannot be restored: .*FileNotFoundError.*{hint}"):
            read()
    shutil.rmtree(tmp_path / "run" / "2")
    assert StateCheckpointer(tmp_path / "run", read_only=True).extra() == {"at": 1}
    np.testing.assert_array_equal(restore_state(tmp_path / "run").params["w"], params["w"])


# --- simulated devices: save on 8, crash mid-save, restore on 4 --------------------------------


def _run(mode: str, directory: Path, devices: int) -> subprocess.CompletedProcess:
    env = subprocess_env(devices)
    return subprocess.run([sys.executable, __file__, mode, str(directory)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_restore_on_other_mesh_after_crash_mid_save(tmp_path: Path) -> None:
    saved = _run("save8", tmp_path, 8)
    # The child kills itself (SIGKILL) at the commit of step 2: every file written, not renamed.
    assert saved.returncode == -9, saved.stderr[-3000:]
    assert (tmp_path / "ckpt" / "1").is_dir() and not (tmp_path / "ckpt" / "2").exists()
    assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in (tmp_path / "ckpt").iterdir())
    restored = _run("restore4", tmp_path, 4)
    assert restored.returncode == 0, restored.stderr[-3000:]
    report = json.loads(restored.stdout.strip().splitlines()[-1])
    assert report["steps_before"] == [1]
    assert report["step"] == 1
    assert report["mismatched"] == []
    assert report["n_devices"] == 4
    # tp=2 x data=2: c_attn [32, 96] column-split over tp; its Adam moments follow it.
    assert report["c_attn_spec"] == [None, "tp"]
    assert report["c_attn_shard"] == [32, 48]
    assert report["mu_c_attn_spec"] == [None, "tp"]
    assert report["steps_after"] == [1, 2]  # saving again works: the crashed tmp folder was cleaned up
    assert report["count_devices"] == report["rng_devices"] == 4  # replicated over the target's mesh


def _worker_save8(root: Path) -> None:
    from trlax.sharding import make_mesh, shard_params

    params, opt_state, adapters = _train_state()
    mesh = make_mesh(fsdp=8)
    params = shard_params(params, mesh, model_type="gpt2")
    opt_state = shard_params(opt_state, mesh, model_type="gpt2")
    assert params["pretrained_model"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].sharding.spec[0] == "fsdp"
    np.savez(root / "expected.npz", **_flat({"params": params, "opt_state": opt_state, "adapters": adapters}))
    save_state(root / "ckpt", 1, params, opt_state, rng=jax.random.key(1), adapters=adapters)

    def crash_at_commit(src: str, dst: str) -> None:
        if os.path.basename(dst) == "2":
            os.kill(os.getpid(), 9)
        real_rename(src, dst)

    real_rename, os.rename = os.rename, crash_at_commit
    save_state(root / "ckpt", 2, jax.tree_util.tree_map(lambda p: p * 2, params), opt_state)


def _worker_restore4(root: Path) -> None:
    from trlax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=1, tp=2)
    steps_before = StateCheckpointer(root / "ckpt", read_only=True).all_steps()
    abstract_params = jax.eval_shape(lambda: _train_state()[0])
    target = {"params": abstract_params, "opt_state": jax.eval_shape(OPT.init, abstract_params)}
    restored = restore_state(root / "ckpt", target=target, target_sharding=mesh, model_type="gpt2")
    expected = np.load(root / "expected.npz")
    got = _flat({"params": restored.params, "opt_state": restored.opt_state, "adapters": restored.adapters})
    mismatched = sorted(set(expected.files) ^ set(got)) + [
        k for k in expected.files if k in got and not np.array_equal(expected[k], got[k])]
    kernel = restored.params["pretrained_model"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    mu = restored.opt_state[0].mu["pretrained_model"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    # A target of arrays on the mesh, no target_sharding: Adam's count (uncommitted on device 0 after init) came
    # back committed to device 0, and the next update refused params spread over the mesh beside it.
    again = restore_state(root / "ckpt", 1, target={"params": restored.params, "opt_state": OPT.init(restored.params)})
    OPT.update(jax.tree_util.tree_map(jnp.ones_like, again.params), again.opt_state, again.params)
    save_state(root / "ckpt", 2, restored.params)
    print(json.dumps({
        "count_devices": len(again.opt_state[0].count.sharding.device_set),
        "rng_devices": len(again.rng.sharding.device_set),
        "steps_before": steps_before, "step": restored.step, "mismatched": mismatched,
        "n_devices": jax.device_count(), "c_attn_spec": list(kernel.sharding.spec),
        "c_attn_shard": list(kernel.addressable_shards[0].data.shape), "mu_c_attn_spec": list(mu.sharding.spec),
        "steps_after": StateCheckpointer(root / "ckpt", read_only=True).all_steps(),
    }))


if __name__ == "__main__":
    {"save8": _worker_save8, "restore4": _worker_restore4}[sys.argv[1]](Path(sys.argv[2]))
