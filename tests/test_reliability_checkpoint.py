"""Checkpoints under hostile or unlucky conditions: crashes at every commit step, two writers,
shard paths leaving the folder, malformed safetensors headers, legacy .bin files, load memory.

Each case reproduces a failure of trlax 0.2 (issue 14, items 1, 2, 3, 6, 7 and 9).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, max_diff, save_torch, subprocess_env, torch_random_init
from tests.tiny_configs import gpt2
from trlax import CheckpointError, FlaxAutoModelForCausalLM
from trlax.checkpoint import atomic
from trlax.checkpoint.lock import FolderLock
from trlax.checkpoint.reader import SafetensorsFile
from trlax.checkpoint.writer import write_checkpoint_dir, write_safetensors

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-4


def _env() -> dict[str, str]:
    return subprocess_env()


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    return torch_random_init(transformers.GPT2LMHeadModel(gpt2()), std=0.1)


@pytest.fixture(scope="module")
def saved(torch_model, tmp_path_factory):
    return save_torch(torch_model, tmp_path_factory.mktemp("gpt2"))


def _torch_logits(torch_model, ids):
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.numpy()


# --- item 2: save_pretrained replaces the folder atomically ---------------------------------------

def _tensors(seed: int, n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(n)}


def _save(target: Path, seed: int, shard: bool) -> None:
    def config(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps({"seed": seed}))

    write_checkpoint_dir(target, _tensors(seed), write_extra=config, max_shard_size="10KB" if shard else None)


def _contents(folder: Path) -> dict[str, bytes] | None:
    if not folder.is_dir():
        return None
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _arm_kill(at: int) -> None:
    """SIGKILL this process just before its `at`-th file-system step (rename, exchange, link,
    fsync, mkdir, unlink, rmdir, symlink, copy)."""
    calls = [0]

    def counted(real):
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return step

    for name in ("rename", "replace", "link", "fsync", "mkdir", "unlink", "rmdir", "symlink"):
        setattr(os, name, counted(getattr(os, name)))
    shutil.copy2 = counted(shutil.copy2)
    atomic.exchange_folders = counted(atomic.exchange_folders)


def _worker_kill_matrix(root: Path, mode: str) -> None:
    """Save old (one file + a tokenizer.json), then in a forked child save new (sharded),
    killed before its k-th file-system step, for k = 1, 2, ... until a save completes.
    After each kill: what the target holds, then whether the next save recovers."""
    if mode == "fallback":
        atomic.exchange_folders = lambda a, b: False
    refs = {}
    for name, seeds in {"old": (1,), "new": (1, 2), "newer": (1, 3)}.items():
        folder = root / "refs" / name
        for i, seed in enumerate(seeds):
            _save(folder, seed, shard=seed == 2)
            if i == 0:
                (folder / "tokenizer.json").write_text("{}")
        refs[name] = _contents(folder)
    results = []
    for k in range(1, 1000):
        work = root / "work"
        shutil.rmtree(work, ignore_errors=True)
        target = work / "model"
        _save(target, 1, shard=False)
        (target / "tokenizer.json").write_text("{}")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _arm_kill(k)
                _save(target, 2, shard=True)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        held = _contents(target)
        state = "missing" if held is None else next((n for n in ("old", "new") if held == refs[n]), f"broken {held}")
        asides = [p for p in work.iterdir() if atomic.OLD_TAG in p.name]
        aside = next((n for n in ("old", "new") if asides and _contents(asides[0]) == refs[n]), None)
        leftovers = sorted(p.name for p in work.iterdir() if p.name != "model")
        _save(target, 3, shard=False)  # the next save
        results.append({"k": k, "killed": killed, "exit": status, "state": state, "aside": aside,
                        "leftovers": leftovers, "after": "newer" if _contents(target) == refs["newer"] else "broken",
                        "after_leftovers": sorted(p.name for p in work.iterdir() if p.name != "model")})
        if not killed:
            break
    print(json.dumps(results))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_kill_at_every_commit_step_leaves_old_or_new(tmp_path, mode):
    done = subprocess.run([sys.executable, __file__, "kill-matrix", str(tmp_path), mode], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    kills = [r for r in results if r["killed"]]
    assert not results[-1]["killed"] and results[-1]["exit"] == 0 and results[-1]["state"] == "new", results[-1]
    assert len(kills) >= 15, len(kills)  # writes, fsyncs, the swap, the cleanup: every one a kill point
    for r in kills:
        if mode == "fallback" and r["state"] == "missing":
            assert r["aside"] == "old", r  # between the two renames: the complete old folder waits aside
        else:
            assert r["state"] in ("old", "new"), r
        assert r["after"] == "newer" and r["after_leftovers"] == [], r  # the next save cleans up / restores
    states = {r["state"] for r in kills}
    assert {"old", "new"} <= states, states  # killed both before and after the swap
    assert ("missing" in states) == (mode == "fallback")
    assert any(r["leftovers"] for r in kills)  # crashes did leave temporary folders, which were removed


def test_next_save_removes_stale_temporaries_but_not_a_live_saves(tmp_path):
    target = tmp_path / "model"
    _save(target, 1, shard=False)
    dead = tmp_path / f".model{atomic.NEW_TAG}deadbeef"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    legacy = target / ".trlax-save-abc123"  # what trlax 0.2 left inside the target after a crash
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".model{atomic.NEW_TAG}0badcafe"
    live.mkdir()
    lock = FolderLock(live)  # a save in progress (in this process: flock is per open file)
    try:
        _save(target, 2, shard=False)
        assert not dead.exists() and not legacy.exists()
        assert live.is_dir()
    finally:
        lock.release()
    _save(target, 3, shard=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert json.loads((target / "config.json").read_text()) == {"seed": 3}


def test_save_keeps_other_files_drops_old_weights_and_follows_symlinks(tmp_path):
    real = tmp_path / "real"
    _save(real, 1, shard=True)
    (real / "tokenizer.json").write_text("{}")
    (real / "logs").mkdir()
    (real / "logs" / "run.txt").write_text("log")
    link = tmp_path / "link"
    link.symlink_to(real)
    _save(link, 2, shard=False)
    assert link.is_symlink()  # the folder it points to was replaced, not the link
    assert sorted(p.name for p in real.iterdir()) == ["config.json", "logs", "model.safetensors", "tokenizer.json"]
    assert (real / "logs" / "run.txt").read_text() == "log"


def test_save_refuses_targets_it_cannot_swap(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        _save(tmp_path / "file", 1, shard=False)
    with pytest.raises(CheckpointError, match="mount point"):
        _save(Path("/proc"), 1, shard=False)
    target = tmp_path / "here"
    target.mkdir()
    monkeypatch.chdir(target)
    with pytest.raises(CheckpointError, match="current working directory"):
        _save(target, 1, shard=False)


def test_save_pretrained_round_trip_still_loads(torch_model, saved, tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="20KB")
    model.save_pretrained(out)  # replaces the sharded save
    # generation_config.json comes back too: the loaded model carries the one transformers saved.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids)) == 0.0


# --- item 1: one Orbax writer per folder -----------------------------------------------------------

def _small_params(scale: float = 1.0):
    import jax.numpy as jnp

    return {"w": jnp.arange(12.0).reshape(3, 4) * scale, "b": jnp.ones(4) * scale}


def _worker_hold_writer(directory: Path) -> None:
    """Open a writer, save step 1, fake a step in progress, then wait (until killed)."""
    from trlax.checkpoint import StateCheckpointer

    checkpointer = StateCheckpointer(directory)
    checkpointer.save(1, _small_params())
    in_flight = directory / "2.orbax-checkpoint-tmp-1700000000000"
    (in_flight / "state").mkdir(parents=True)
    (in_flight / "state" / "data").write_bytes(b"half written")
    print("ready", flush=True)
    sys.stdin.read()


def _worker_race(directory: Path, step: str, start: str) -> None:
    """Wait for the file `start`, then save `step` and keep the checkpointer open for 3 s."""
    from trlax.checkpoint import save_state

    print("ready", flush=True)
    while not Path(start).exists():
        time.sleep(0.01)
    try:
        save_state(directory, int(step), _small_params(int(step)))
        time.sleep(3)
        print(json.dumps({"ok": True}))
    except CheckpointError as e:
        print(json.dumps({"ok": False, "error": str(e)}))


def _wait_ready(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    assert line.strip() == "ready", (line, process.stderr.read()[-3000:] if process.poll() is not None else "")


@pytest.mark.slow
def test_second_writer_is_refused_and_never_deletes_a_live_step(tmp_path):
    from trlax.checkpoint import StateCheckpointer, restore_state, save_state

    directory = tmp_path / "ckpt"
    holder = _spawn("hold-writer", str(directory))
    try:
        _wait_ready(holder)
        in_flight = directory / "2.orbax-checkpoint-tmp-1700000000000"
        with pytest.raises(CheckpointError, match=f"already has a writer: pid {holder.pid} on host"):
            StateCheckpointer(directory)
        with pytest.raises(CheckpointError, match="already has a writer"):
            save_state(directory, 3, _small_params())
        assert (in_flight / "state" / "data").read_bytes() == b"half written"  # untouched
        assert restore_state(directory).step == 1  # readers need no lock
    finally:
        holder.kill()
        holder.communicate()
    # The owner died: its lock is free, and the new writer cleans up what it left.
    with StateCheckpointer(directory) as checkpointer:
        checkpointer.save(3, _small_params(3.0))
        assert checkpointer.all_steps() == [1, 3]
    assert not in_flight.exists()  # removed when the new writer opened the folder
    np.testing.assert_array_equal(restore_state(directory, step=3).params["w"], np.asarray(_small_params(3.0)["w"]))


@pytest.mark.slow
def test_two_processes_saving_into_one_folder(tmp_path):
    from trlax.checkpoint import restore_state

    directory, start = tmp_path / "ckpt", tmp_path / "start"
    workers = [_spawn("race", str(directory), str(step), str(start)) for step in (1, 2)]
    for worker in workers:
        _wait_ready(worker)
    start.touch()
    outputs = [worker.communicate(timeout=300) for worker in workers]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, err in outputs]
    assert sorted(r["ok"] for r in reports) == [False, True], (reports, [err[-2000:] for _, err in outputs])
    loser = next(r for r in reports if not r["ok"])
    assert "already has a writer" in loser["error"]
    winner = 1 + [r["ok"] for r in reports].index(True)
    restored = restore_state(directory)
    assert restored.step == winner
    np.testing.assert_array_equal(restored.params["w"], np.asarray(_small_params(winner)["w"]))


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    from trlax.checkpoint import StateCheckpointer

    first = StateCheckpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"\(this process\)"):
        StateCheckpointer(tmp_path)
    first.close()
    StateCheckpointer(tmp_path).close()  # released on close


def test_incomplete_step_is_not_listed(tmp_path):
    from trlax.checkpoint import StateCheckpointer, restore_state

    with StateCheckpointer(tmp_path) as checkpointer:
        checkpointer.save(1, _small_params())
        checkpointer.save(2, _small_params(2.0))
    (tmp_path / "2" / "state" / "commit_success.txt").unlink()  # step 2's arrays never finished
    reader = StateCheckpointer(tmp_path, read_only=True)
    assert reader.all_steps() == [1] and reader.latest_step() == 1
    assert restore_state(tmp_path).step == 1
    with pytest.raises(CheckpointError, match="step 2 is not saved .* incomplete"):
        restore_state(tmp_path, step=2)
    # A writer removes it: Orbax counted it toward max_to_keep and deleted the good step 1 for it.
    with StateCheckpointer(tmp_path, max_to_keep=2) as checkpointer:
        checkpointer.save(3, _small_params(3.0))
    assert StateCheckpointer(tmp_path, read_only=True).all_steps() == [1, 3]
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "notes.txt").write_text("not a step")
    with pytest.raises(CheckpointError, match="9 is named like a saved step but holds no training state"):
        StateCheckpointer(tmp_path, max_to_keep=2)


# --- item 3: shard paths stay inside the checkpoint; no key in two shards ------------------------------

def _sharded(model, folder: Path) -> dict:
    model.save_pretrained(folder, max_shard_size="20KB")
    return json.loads((folder / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("where", ["absolute", "parent", "etc_passwd", "nested_parent"])
def test_index_shard_outside_the_folder_is_refused(saved, tmp_path, where):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    folder = tmp_path / "a" / "b" / "ckpt"
    index = _sharded(model, folder)
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "x"
    outside.mkdir()
    shutil.copy(folder / first, outside / first)  # a valid shard, so only the path can be wrong
    name = {"absolute": str(outside / first), "parent": f"../../../x/{first}",
            "etc_passwd": "../../../../../etc/passwd", "nested_parent": f"sub/../../../../x/{first}"}[where]
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


def test_same_key_in_two_shards_is_refused(saved, tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    folder = tmp_path / "ckpt"
    index = _sharded(model, folder)
    shards = sorted(set(index["weight_map"].values()))
    state = model.state_dict()
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    second = {k: state[k] for k, v in index["weight_map"].items() if v == shards[1]}
    write_safetensors(folder / shards[1], {**second, key: state[key] * 0}, {"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is stored twice"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


def test_index_with_a_duplicate_key_is_refused(saved, tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    folder = tmp_path / "ckpt"
    index = _sharded(model, folder)
    text = json.dumps(index)
    key, shard = next(iter(index["weight_map"].items()))
    text = text.replace('"weight_map": {', f'"weight_map": {{"{key}": "{shard}", ', 1)
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="appears twice"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


# --- item 6: safetensors headers checked as the safetensors library checks them ------------------------

def _raw(header: object, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


F32_16 = {"dtype": "F32", "shape": [4]}
BAD_HEADERS = {
    "negative_offsets": (_raw({"a": {**F32_16, "data_offsets": [-16, 0]}}, bytes(16)), "data_offsets"),
    "very_negative": (_raw({"a": {**F32_16, "data_offsets": [-(2**62), -(2**62) + 16]}}, bytes(16)), "data_offsets"),
    "list_header": (_raw([1, 2, 3], bytes(16)), "must be a JSON object"),
    "overlap": (_raw({"a": {**F32_16, "data_offsets": [0, 16]}, "b": {**F32_16, "data_offsets": [8, 24]}},
                     bytes(24)), "'b'.* overlaps"),
    "gap": (_raw({"a": {**F32_16, "data_offsets": [8, 24]}}, bytes(24)), "'a'.* gap"),
    "trailing": (_raw({"a": {**F32_16, "data_offsets": [0, 16]}}, bytes(24)), "8 trailing byte"),
    "out_of_bounds": (_raw({"a": {**F32_16, "data_offsets": [0, 16]}}, bytes(8)), "truncated: tensor 'a'"),
    "size_mismatch": (_raw({"a": {**F32_16, "data_offsets": [0, 12]}}, bytes(12)), "'a'.* needs 16 bytes"),
    "bad_metadata": (_raw({"__metadata__": {"x": 1}, "a": {**F32_16, "data_offsets": [0, 16]}}, bytes(16)),
                     "__metadata__"),
    "duplicate_key": (b"", "appears twice"),  # built below: json.dumps cannot repeat a key
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_safetensors_is_refused_like_the_library(tmp_path, case):
    from safetensors import SafetensorError, safe_open

    data, message = BAD_HEADERS[case]
    if case == "duplicate_key":
        blob = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, ' \
               b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
        data = struct.pack("<Q", len(blob)) + blob + bytes(16)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as error:
        SafetensorsFile(path)
    assert str(path) in str(error.value)
    if case != "duplicate_key":  # (the library keeps the last copy of a duplicated key)
        with pytest.raises((SafetensorError, ValueError, OverflowError)), safe_open(path, "np") as f:
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118


def test_well_formed_safetensors_reads_like_the_library(tmp_path):
    from safetensors.numpy import load_file

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 4), np.float16),
               "c": np.array(3, np.int64)}
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    expected = load_file(tmp_path / "m.safetensors")
    opened = SafetensorsFile(tmp_path / "m.safetensors")
    try:
        for key, value in expected.items():
            got = opened.get(key)
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
        np.testing.assert_array_equal(opened.read_rows("a", 1, 2), tensors["a"][1:2])
    finally:
        opened.close()


def test_shifted_offsets_in_a_model_checkpoint_are_refused(saved, tmp_path):
    """trlax 0.2 read another tensor's bytes as this one's weights here."""
    shutil.copy(saved / "config.json", tmp_path)
    data = (saved / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start - 64, end - 64]  # now overlapping the tensor before it
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    (tmp_path / "model.safetensors").write_bytes(data[:8] + blob + data[8 + n:])
    with pytest.raises(CheckpointError, match=f"model.safetensors.*'{key}'"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)


def test_integer_tensor_for_a_float_param_is_refused(torch_model, tmp_path):
    state = {k: v.clone() for k, v in torch_model.state_dict().items() if k != "lm_head.weight"}
    state["transformer.ln_f.weight"] = torch.ones(32, dtype=torch.int32)
    folder = save_torch(torch_model, tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=r"transformer\.ln_f\.weight \(int32 in .*model\.safetensors\)"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


# --- item 7: legacy (non-zip) pytorch_model.bin --------------------------------------------------------

def test_legacy_non_zip_bin_loads(torch_model, saved, tmp_path):
    shutil.copy(saved / "config.json", tmp_path)
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # transformers can
    model = FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(reference, ids), model(ids).logits) < ATOL


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["TRLAX_TEST_PWNED"])),))


def test_legacy_bin_never_runs_pickled_code(saved, tmp_path, monkeypatch):
    shutil.copy(saved / "config.json", tmp_path)
    monkeypatch.setenv("TRLAX_TEST_PWNED", str(tmp_path / "pwned"))
    torch.save({"transformer.wte.weight": torch.ones(2), "x": _Payload()}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="could not be read as a PyTorch checkpoint"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


# --- item 9: load memory -----------------------------------------------------------------------------

@pytest.mark.slow
def test_load_peak_memory_is_close_to_the_params():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_memory.py"), "--hidden", "512",
                           "--layers", "2", "--vocab", "32000"], env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = {r["case"]: r["ratio"] for r in map(json.loads, done.stdout.splitlines()[:3])}
    assert set(ratios) == {"f32-f32", "bf16-bf16", "bf16-f32"}
    assert all(ratio <= 1.3 for ratio in ratios.values()), ratios


if __name__ == "__main__":
    mode, folder, *rest = sys.argv[1:]
    workers = {"kill-matrix": _worker_kill_matrix, "hold-writer": _worker_hold_writer, "race": _worker_race}
    workers[mode](Path(folder), *rest)
