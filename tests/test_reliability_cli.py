"""Command-line failures are one line and a non-zero exit (issue 14, item 8).

Bad destinations, sizes and configs fail before any work; `demo` checks its output folder
before training and keeps metrics.json current while it trains; a batch that cannot fit
fails before anything is allocated; `info` reads Orbax model folders; damaged Orbax data
raises CheckpointError.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import trlax.cli.demo
import trlax.cli.info
import trlax.cli.preflight
from tests.tiny_configs import gpt2
from trlax import CheckpointError, FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead
from trlax.checkpoint.convert import load_orbax, to_orbax
from trlax.checkpoint.state import restore_state, save_state, wait_until_finished
from trlax.cli import main
from trlax.cli.demo_report import METRICS_FILE
from trlax.cli.preflight import check_batch_fits, step_bytes_lower_bound
from trlax.errors import TrlaxError

HAS_PROC = Path("/proc/self").is_dir()  # a virtual file system no folder can be created in


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err: str, command: str, message: str) -> None:
    assert err.count("\n") == 1 and err.startswith(f"trlax {command}: error: ") and message in err, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with TRL's value head, saved by trlax."""
    lm = FlaxAutoModelForCausalLM.from_config(gpt2())
    folder = tmp_path_factory.mktemp("ckpt") / "gpt2"
    FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def orbax_folder(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_orbax(checkpoint, tmp_path_factory.mktemp("orbax") / "model", progress=False)


# --- convert --------------------------------------------------------------------------------
def test_convert_to_an_existing_file_is_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "some_file"
    target.write_text("x")
    code, _, err = _run(["convert", str(checkpoint), str(target)], capsys)
    assert code == 1
    _one_line(err, "convert", f"DST {target} exists and is not a folder")
    assert target.read_text() == "x"
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        to_orbax(checkpoint, target, progress=False)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_convert_to_an_unwritable_place_fails_before_reading(checkpoint: Path, capsys) -> None:
    code, out, err = _run(["convert", str(checkpoint), "/proc/trlax-x", "--no-progress"], capsys)
    assert code == 1 and out == ""
    _one_line(err, "convert", "DST /proc/trlax-x cannot be written")


def test_bad_max_shard_size_is_a_usage_error(orbax_folder: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _run(["convert", str(orbax_folder), str(tmp_path / "hf"), "--max-shard-size", "12parsecs"],
                        capsys)
    assert code == 2
    _one_line(err, "convert", "max_shard_size '12parsecs' is not a size")
    assert not (tmp_path / "hf").exists()
    code, _, _ = _run(["convert", str(orbax_folder), str(tmp_path / "hf"), "--max-shard-size", "40000",
                       "--no-progress"], capsys)
    assert code == 0 and len(list((tmp_path / "hf").glob("*.safetensors"))) > 1  # bytes as a plain number


@pytest.mark.parametrize("config_text", ["{not json", '{"model_type": "gpt2", "n_layer": "two"}'])
def test_invalid_config_json_is_a_checkpoint_error(checkpoint: Path, tmp_path: Path, config_text: str,
                                                   capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.safetensors",):
        (bad / name).write_bytes((checkpoint / name).read_bytes())
    (bad / "config.json").write_text(config_text)
    with pytest.raises(CheckpointError, match="is not a valid transformers config") as info:
        FlaxAutoModelForCausalLM.from_pretrained(bad)
    assert not isinstance(info.value, OSError)
    for argv, command in ((["convert", str(bad), str(tmp_path / "out")], "convert"), (["info", str(bad)], "info")):
        code, _, err = _run(argv, capsys)
        assert code == 1
        _one_line(err, command, "is not a valid transformers config")
    assert not (tmp_path / "out").exists()


# --- demo and ppo ---------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
@pytest.mark.parametrize("command", ["demo", "ppo"])
def test_unwritable_output_dir_fails_before_training(command: str, capsys) -> None:
    code, out, err = _run([command, "--output-dir", "/proc/trlax-x"], capsys)
    assert code == 1 and out == ""  # nothing built, nothing trained
    _one_line(err, command, "--output-dir /proc/trlax-x cannot be written")


@pytest.mark.parametrize("command", ["demo", "ppo"])
def test_a_batch_that_cannot_fit_fails_before_allocating(command: str, tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    # A 1 MB budget, so that without the check this would train (briefly), not exhaust the machine.
    monkeypatch.setattr(trlax.cli.preflight, "memory_limit", lambda: (10**6, "a test budget of 1 MB"))
    argv = [command, "--batch-size", "4096", "--steps", "1", "--output-dir", str(tmp_path / "out")]
    code, _, err = _run(argv + (["--quiet"] if command == "ppo" else []), capsys)
    assert code == 1
    _one_line(err, command, "--batch-size 4096 cannot fit: one PPO step over 4096 sequences")
    assert "a test budget of 1 MB" in err and not (tmp_path / "out" / METRICS_FILE).exists()


def test_batch_fit_check_against_the_memory_limit(monkeypatch) -> None:
    config = gpt2()
    with pytest.raises(TrlaxError, match="--batch-size 1000000000 cannot fit"):  # the case, any machine
        check_batch_fits(config, 10**9, 16)
    need = step_bytes_lower_bound(config, 8, 16)
    assert need == 8 * 16 * (3 * 101 + 2 * (8 * 32 + 4 * 16)) * 4
    monkeypatch.setattr(trlax.cli.preflight, "memory_limit", lambda: (need, "a test budget"))
    check_batch_fits(config, 8, 16)  # exactly at the limit: allowed
    with pytest.raises(TrlaxError, match="--batch-size 9 cannot fit.*a test budget.*; use a smaller --batch-size"):
        check_batch_fits(config, 9, 16)
    # where one sequence alone is too long, a smaller batch cannot help (the message said it would)
    with pytest.raises(TrlaxError, match="--batch-size 1 cannot fit.*even one sequence that long does not fit: use "
                                         "a smaller --max-new-tokens"):
        check_batch_fits(config, 1, 16 * 9)


def test_the_batch_fit_check_counts_the_rows_computed_at_once(monkeypatch) -> None:
    """`trlax ppo` computes the forwards and updates over minibatches: a batch that only fits that way is
    allowed, and one that does not names --mini-batch-size where a smaller one would fit."""
    config = gpt2()
    per_token = 3 * 101 + 2 * (8 * 32 + 4 * 16)
    assert step_bytes_lower_bound(config, 64, 16, mini_batch_size=8) == 16 * (8 * per_token + 56 * 13) * 4
    assert step_bytes_lower_bound(config, 64, 16, mini_batch_size=64) == step_bytes_lower_bound(config, 64, 16)
    budget = step_bytes_lower_bound(config, 64, 16, mini_batch_size=8)
    monkeypatch.setattr(trlax.cli.preflight, "memory_limit", lambda: (budget, "a test budget"))
    check_batch_fits(config, 64, 16, mini_batch_size=8)
    with pytest.raises(TrlaxError, match="--batch-size 64 cannot fit.*use a smaller --mini-batch-size"):
        check_batch_fits(config, 64, 16, mini_batch_size=16)
    with pytest.raises(TrlaxError, match="--batch-size 64 cannot fit.*; use a smaller --batch-size$"):
        check_batch_fits(config, 64, 16)


class _FakeLoop:
    """Stands in for the demo's PPOLoop: three steps of made-up metrics, then a crash."""

    def __init__(self, models, config) -> None:
        self.steps = 0
        self.params = models.policy.params

    def samples(self, n: int = 4) -> list[dict]:
        return [{"prompt": "^b", "reply": "aeiou", "reward": 1.0}] * n

    def step(self) -> dict[str, float]:
        self.steps += 1
        if self.steps > 3:
            raise RuntimeError("simulated crash")
        return {"reward": 0.1 * self.steps, "kl": 0.0, "value_loss": 1.0}


def test_demo_saves_metrics_as_it_goes(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(trlax.cli.demo, "PPOLoop", _FakeLoop)
    out = tmp_path / "run"
    code, _, err = _run(["demo", "--steps", "10", "--output-dir", str(out)], capsys)
    assert code == 1 and err.endswith("\ntrlax demo: error: unexpected RuntimeError: simulated crash (TRLAX_DEBUG=1 "
                                      "shows the traceback; please report it)\n")  # after the progress bar
    assert sorted(p.name for p in out.iterdir()) == [METRICS_FILE]
    log = json.loads((out / METRICS_FILE).read_text())
    assert [s["step"] for s in log["steps"]] == [0, 1, 2]
    assert log["steps"][2]["reward"] == pytest.approx(0.3) and log["summary"] is None
    assert log["config"]["steps"] == 10 and log["samples_before"][0]["reply"] == "aeiou"


# --- the catch-all --------------------------------------------------------------------------
@pytest.mark.parametrize(("error", "message"), [
    (PermissionError(13, "Permission denied", "/x/y"), "Permission denied: /x/y"),
    (MemoryError(), "out of memory"),
    (RuntimeError("boom\nsecond line"), "unexpected RuntimeError: boom second line (TRLAX_DEBUG=1"),
])
def test_any_failure_is_one_line(error: Exception, message: str, monkeypatch, capsys) -> None:
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(trlax.cli.info, "model_info", fail)
    code, _, err = _run(["info", "x"], capsys)
    assert code == 1
    _one_line(err, "info", message)
    monkeypatch.setenv("TRLAX_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["info", "x"])


def test_an_adapter_config_that_is_not_utf8_is_a_checkpoint_error(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A stray Latin-1 byte in adapter_config.json was a raw UnicodeDecodeError (no TrlaxError; `trlax info`:
    "unexpected ... please report it"), where config.json's already named the file."""
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(checkpoint, peft_config={"r": 2})
    policy.save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_bytes(config.read_bytes().replace(b'"r": 2', '"r": 2, "note": "café"'.encode("latin-1")))
    with pytest.raises(CheckpointError, match=r"adapter_config.json is not valid JSON .*re-save"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter")
    code, _, err = _run(["info", str(tmp_path / "adapter")], capsys)
    assert code == 1
    _one_line(err, "info", "adapter_config.json is not valid JSON")


# --- Orbax ----------------------------------------------------------------------------------
def test_info_reads_an_orbax_model_folder(orbax_folder: Path, checkpoint: Path, capsys) -> None:
    code, orbax_text, _ = _run(["info", str(orbax_folder), "--json"], capsys)
    assert code == 0
    code, hf_text, _ = _run(["info", str(checkpoint), "--json"], capsys)
    orbax_info, hf_info = json.loads(orbax_text), json.loads(hf_text)
    lm = FlaxAutoModelForCausalLM.from_config(gpt2())
    assert orbax_info["parameters"] == hf_info["parameters"] == lm.num_params() > 0
    assert orbax_info["value_head"] == hf_info["value_head"] == {"shape": [1, 32], "dtype": "float32"}
    assert orbax_info["by_dtype"]["float32"]["params"] == hf_info["by_dtype"]["float32"]["params"]
    assert "Orbax model folder" in orbax_info["note"]


def _damage(folder: Path) -> int:
    """Overwrite every data file of an Orbax checkpoint (not its metadata) with a few bytes."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    for path in files:
        path.write_bytes(b"damaged")
    return len(files)


def test_a_damaged_orbax_step_is_a_checkpoint_error(tmp_path: Path) -> None:
    params = {"w": jnp.arange(12.0).reshape(3, 4)}
    save_state(tmp_path / "state", 1, params, {"mu": jnp.ones(3)})
    wait_until_finished(tmp_path / "state")
    assert _damage(tmp_path / "state" / "1" / "state") > 0
    with pytest.raises(CheckpointError, match="step 1 in .* cannot be restored: its files are damaged"):
        restore_state(tmp_path / "state")


def test_a_damaged_orbax_model_folder_is_a_checkpoint_error(orbax_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    for path in orbax_folder.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(orbax_folder)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(orbax_folder)).write_bytes(path.read_bytes())
    assert np.isfinite(np.asarray(load_orbax(copy).params["v_head"]["summary"]["kernel"])).all()
    assert _damage(copy / "params") > 0
    with pytest.raises(CheckpointError, match="cannot be restored: its files are damaged"):
        load_orbax(copy)
