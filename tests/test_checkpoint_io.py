"""Loading and saving transformers checkpoints: formats, hub cache, round trips, bad input."""

from __future__ import annotations

import copy
import errno
import json
import logging
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from huggingface_hub import scan_cache_dir

from tests.helpers import batch, max_diff, save_torch, torch_random_init
from tests.hub_stand_in import lay_out_hub_cache
from tests.tiny_configs import gpt2
from trlax import (
    CheckpointError,
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    LoraConfig,
    TrlaxError,
    UnsupportedModelError,
)
from trlax.checkpoint.naming import flatten_paths
from trlax.checkpoint.reader import SafetensorsFile
from trlax.checkpoint.writer import parse_size
from trlax.errors import CheckpointWriteError

ATOL = 1e-4


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


def _assert_same_params(a, b):
    flat_a, flat_b = dict(flatten_paths(a)), dict(flatten_paths(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


def test_trlax_save_loads_in_transformers_with_identical_logits(torch_model, saved, tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    model.save_pretrained(tmp_path / "out")
    # generation_config.json comes back too: the loaded model carries the one transformers saved.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids)) == 0.0
    for key, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), torch_model.state_dict()[key].numpy(), err_msg=key)
    # trlax -> trlax is bit-exact too.
    _assert_same_params(FlaxAutoModelForCausalLM.from_pretrained(tmp_path / "out").params, model.params)


def test_weights_without_config_json_load_with_config_given(saved, tmp_path):
    """transformers loads a folder of weights only when config= is given; trlax demanded config.json anyway."""
    shutil.copy(saved / "model.safetensors", tmp_path / "model.safetensors")
    config = transformers.AutoConfig.from_pretrained(saved)
    want = FlaxAutoModelForCausalLM.from_pretrained(saved).params
    _assert_same_params(FlaxAutoModelForCausalLM.from_pretrained(tmp_path, config=config).params, want)
    wrapper = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, config=config)
    _assert_same_params(wrapper.params["pretrained_model"], want)
    with pytest.raises(CheckpointError, match="no config.json in .*or pass config="):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)


def test_transformers_subfolder_is_refused_with_what_to_do(saved):
    """subfolder= was refused as an unknown keyword, which read like a typo."""
    for cls in (FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead):
        with pytest.raises(UnsupportedModelError, match="subfolder='policy' is not supported: .*snapshot_download"):
            cls.from_pretrained(saved, subfolder="policy")


def test_a_load_reads_each_tensor_once(saved, monkeypatch):
    """The storage dtype was found by reading every tensor (`get`), a whole extra pass over the checkpoint; on a
    multi-host mesh each host then read 1.5x the file instead of its half."""
    read = []
    original = SafetensorsFile.read_bytes
    monkeypatch.setattr(SafetensorsFile, "read_bytes", lambda self, at, n: read.append(n) or original(self, at, n))
    data = sum(a.nbytes for a in safetensors.numpy.load_file(saved / "model.safetensors").values())
    for model_class in (FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead):
        read.clear()
        model_class.from_pretrained(saved)
        assert sum(read) == data, model_class.__name__


def test_sharded_transformers_checkpoint_loads(torch_model, tmp_path):
    folder = save_torch(torch_model, tmp_path / "sharded", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    model = FlaxAutoModelForCausalLM.from_pretrained(folder)
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(torch_model, ids), model(ids).logits) < ATOL


def test_sharded_trlax_save_loads_in_transformers(torch_model, saved, tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids)) == 0.0
    # A later single-file save into the same folder removes the stale shards and index.
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]


def test_legacy_pytorch_model_bin_loads(torch_model, saved, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(saved / "config.json", folder)
    torch.save(torch_model.state_dict(), folder / "pytorch_model.bin")
    model = FlaxAutoModelForCausalLM.from_pretrained(folder)
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(torch_model, ids), model(ids).logits) < ATOL


def test_bin_without_torch_says_how_to_install(torch_model, saved, tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(saved / "config.json", folder)
    torch.save(torch_model.state_dict(), folder / "pytorch_model.bin")
    config = transformers.AutoConfig.from_pretrained(folder)  # transformers itself imports torch when present
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'trlax\[torch\]'"):
        FlaxAutoModelForCausalLM.from_pretrained(folder, config=config)


def test_checkpoint_of_the_bare_base_model_loads_without_its_prefix(torch_model, tmp_path):
    """The original `gpt2` hub files were saved from GPT2Model: keys `h.0...`, `wte.weight`."""
    folder = save_torch(torch_model.transformer, tmp_path / "bare")
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "np") as f:
        assert "wte.weight" in f.keys()  # noqa: SIM118 - safe_open is not a dict
    model = FlaxAutoModelForCausalLM.from_pretrained(folder, config=torch_model.config)
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(torch_model, ids), model(ids).logits) < ATOL


def test_bf16_checkpoint_loads_into_float32_params(torch_model, tmp_path):
    folder = save_torch(copy.deepcopy(torch_model).to(torch.bfloat16), tmp_path / "bf16")
    model = FlaxAutoModelForCausalLM.from_pretrained(folder)
    leaf = model.params["transformer"]["wte"]["embedding"]
    assert leaf.dtype == np.float32
    expected = torch_model.transformer.wte.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(leaf), expected)


def test_hub_id_resolves_from_local_cache_offline(torch_model, saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lay_out_hub_cache(tmp_path / "cache", "tiny-org/tiny-gpt2", saved)
    assert [r.repo_id for r in scan_cache_dir(tmp_path / "cache").repos] == ["tiny-org/tiny-gpt2"]
    model = FlaxAutoModelForCausalLM.from_pretrained("tiny-org/tiny-gpt2", cache_dir=tmp_path / "cache")
    ids, _ = batch(101, "none")
    assert max_diff(_torch_logits(torch_model, ids), model(ids).logits) < ATOL
    with pytest.raises(CheckpointError, match="not in the hub cache"):
        FlaxAutoModelForCausalLM.from_pretrained("tiny-org/absent", cache_dir=tmp_path / "cache")
    # A repo of weights only, read with config= (as transformers reads it): config.json need not be cached.
    (tmp_path / "weights").mkdir()
    shutil.copy(saved / "model.safetensors", tmp_path / "weights" / "model.safetensors")
    lay_out_hub_cache(tmp_path / "cache", "tiny-org/weights-only", tmp_path / "weights")
    config = transformers.AutoConfig.from_pretrained(saved)
    for cls in (FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead):
        loaded = cls.from_pretrained("tiny-org/weights-only", config=config, cache_dir=tmp_path / "cache",
                                     local_files_only=True)
        lm = getattr(loaded, "pretrained_model", loaded)
        assert max_diff(lm(ids).logits, model(ids).logits) == 0.0


def test_value_head_keys_are_skipped_by_plain_lm_with_a_log_line(torch_model, saved, tmp_path, caplog):
    state = {k: v for k, v in torch_model.state_dict().items() if k != "lm_head.weight"}
    state["v_head.summary.weight"] = torch.ones(1, 32)
    state["v_head.summary.bias"] = torch.zeros(1)
    folder = save_torch(torch_model, tmp_path / "trl", state_dict=state)
    with caplog.at_level(logging.INFO, logger="trlax"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)
    assert "v_head.summary.weight" in caplog.text


# --- bad input ------------------------------------------------------------------------------

def _edit_state(torch_model, folder: Path, edit) -> Path:
    state = {k: v.clone() for k, v in torch_model.state_dict().items() if k != "lm_head.weight"}
    edit(state)
    return save_torch(torch_model, folder, state_dict=state)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)


def test_folder_without_weights_is_refused(saved, tmp_path):
    shutil.copy(saved / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)


def test_unknown_model_type_lists_supported_ones(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(saved / "model.safetensors", tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*supported: \[.*'gpt2'"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    config["model_type"] = "no-such-architecture"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_tensor_is_named(torch_model, tmp_path):
    folder = _edit_state(torch_model, tmp_path, lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*transformer\.h\.1\.mlp\.c_fc\.weight"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


def test_wrong_shape_is_named(torch_model, tmp_path):
    folder = _edit_state(torch_model, tmp_path,
                         lambda s: s.__setitem__("transformer.ln_f.weight", torch.ones(31)))
    with pytest.raises(CheckpointError, match=r"transformer\.ln_f\.weight: checkpoint \(31,\) vs model \(32,\)"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


def test_unexpected_tensor_is_named(torch_model, tmp_path):
    folder = _edit_state(torch_model, tmp_path, lambda s: s.__setitem__("transformer.h.2.ln_1.weight", torch.ones(32)))
    with pytest.raises(CheckpointError, match=r"does not use: transformer\.h\.2\.ln_1\.weight"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "tiny"])
def test_corrupt_safetensors_is_refused(saved, tmp_path, damage):
    shutil.copy(saved / "config.json", tmp_path)
    data = (saved / "model.safetensors").read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage_header":
        data = data[:8] + b"\xff" * 50 + data[58:]
    else:
        data = data[:5]
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt|truncated|not a safetensors"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path)


def test_failed_save_leaves_no_loadable_checkpoint(saved, tmp_path, monkeypatch):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    import trlax.checkpoint.writer as writer

    def broken(path, tensors, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_state_dict_takes_the_dtypes_save_pretrained_takes(saved):
    """state_dict(dtype=) cast with numpy directly: int8 gave all-zero weights and bool all-True ones without a
    word, while "auto" and torch dtypes (which save_pretrained takes) raised numpy's TypeError."""
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    for dtype, want in (("auto", np.float32), (torch.bfloat16, "bfloat16"), ("float16", np.float16)):
        assert {np.dtype(a.dtype) for a in model.state_dict(dtype=dtype).values()} == {np.dtype(want)}, dtype
    for dtype in (np.int8, "bool", torch.int32, "float8_e4m3fn", torch.float8_e5m2):  # float8: transformers fails
        with pytest.raises(UnsupportedModelError, match="cannot save the weights as .*: pass a float dtype"):
            model.state_dict(dtype=dtype)


def test_auto_dtype_refuses_a_config_that_declares_a_non_float_dtype(saved, tmp_path):
    """config.json `"dtype": "int8"`: transformers refuses dtype="auto" ("not a floating-point dtype"); trlax
    quietly loaded the file's float dtype. An explicit dtype does not read the config's, in either library."""
    folder = tmp_path / "int8"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "int8"}))
    with pytest.raises(UnsupportedModelError, match=r'dtype="auto" .* config.json declares int8, not a float dtype'):
        FlaxAutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert FlaxAutoModelForCausalLM.from_pretrained(folder, dtype=np.float32).dtype == np.float32


def test_a_write_error_names_the_folder(saved, tmp_path, monkeypatch):
    """safetensors' write error names no file: `trlax convert` said only "error: File too large"."""
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    import trlax.checkpoint.writer as writer

    def too_large(path, tensors, metadata):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(writer, "write_safetensors", too_large)
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*out: File too large; it is left as it was") as e:
        model.save_pretrained(tmp_path / "out")
    assert isinstance(e.value, OSError) and isinstance(e.value.__cause__, OSError)


def test_a_stored_tied_copy_that_differs_is_refused(torch_model, tmp_path):
    """transformers unties such a pair (and warns); trlax, one tensor for both, used the embedding: logits 10 off."""
    from safetensors.numpy import load_file, save_file

    folder = save_torch(torch_model, tmp_path / "pt")
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    FlaxAutoModelForCausalLM.from_pretrained(folder)  # an equal copy loads
    tensors["lm_head.weight"][3] += 1
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="ties lm_head.weight to transformer.wte.weight.*tie_word_embeddings"):
        FlaxAutoModelForCausalLM.from_pretrained(folder)


def test_saving_keywords_that_cannot_be_right_are_refused_before_writing(saved, tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    model.save_pretrained(tmp_path / "out")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir())
    for kwargs, match in (({"dtype": "int8"}, "float dtype"), ({"max_shard_size": 0}, "at least 1 byte"),
                          ({"max_shard_size": 5e8}, "not a size"), ({"max_shard_size": True}, "not a size")):
        with pytest.raises(TrlaxError, match=match):
            model.save_pretrained(tmp_path / "out", **kwargs)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()) == before
    assert parse_size("5GB") == 5 * 10**9 and parse_size("5Gb") == parse_size("5gb") == 5 * 10**9 // 8  # bits


def test_a_full_save_drops_an_earlier_adapter_save(saved, tmp_path):
    """The old adapter_config.json made the folder load as the old LoRA policy (logits 0.3 off)."""
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(saved, peft_config=LoraConfig(r=4))
    policy.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").exists()
    full = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(saved)
    full.save_pretrained(tmp_path / "out")
    assert not list((tmp_path / "out").glob("adapter_*"))
    back = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "out")
    assert not back.is_peft_model


@pytest.mark.parametrize("text", ["{", "[1, 2]"])
def test_an_unreadable_generation_config_falls_back_to_config_json_with_a_warning(saved, tmp_path, caplog, text):
    """A damaged generation_config.json failed the load with a raw OSError / TypeError after every weight was
    read; transformers falls back to the model config (for "{")."""
    folder = shutil.copytree(saved, tmp_path / "model")
    (folder / "generation_config.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model = FlaxAutoModelForCausalLM.from_pretrained(folder)
    assert "generation_config.json cannot be read" in caplog.text and "come from config.json" in caplog.text
    assert model.generation_config.eos_token_id == gpt2().eos_token_id


def test_a_save_over_another_models_folder_drops_its_generation_settings(saved, tmp_path):
    """A model without generation settings saved over a folder that had some: the old generation_config.json
    (sampling at temperature 0.3, eos 77) stayed and was read back as this model's."""
    sampler = FlaxAutoModelForCausalLM.from_pretrained(saved)
    sampler.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.3, eos_token_id=77)
    sampler.save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "tokenizer_config.json").write_text("{}")  # other files are still carried over
    plain = FlaxAutoModelForCausalLM.from_config(gpt2())
    assert plain.generation_config is None
    plain.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer_config.json"]
    back = FlaxAutoModelForCausalLM.from_pretrained(tmp_path / "out").generation_config
    assert not back.do_sample and back.eos_token_id == gpt2().eos_token_id


def test_non_finite_params_are_saved_with_a_warning(saved, tmp_path, caplog):
    """A diverged run's params still save (worth inspecting), but not silently."""
    model = FlaxAutoModelForCausalLM.from_pretrained(saved)
    params = jax.tree_util.tree_map(lambda x: x, model.params)
    params["transformer"]["wte"]["embedding"] = params["transformer"]["wte"]["embedding"].at[0, 0].set(np.nan)
    with caplog.at_level(logging.WARNING, logger="trlax"):
        model.save_pretrained(tmp_path / "out", params=params, dtype="bfloat16")
    assert "1 tensor(s) hold NaN or inf values, e.g. ['transformer.wte.weight']" in caplog.text
    assert np.isnan(np.asarray(FlaxAutoModelForCausalLM.from_pretrained(tmp_path / "out").params["transformer"]["wte"]
                               ["embedding"][0, 0], np.float32))
