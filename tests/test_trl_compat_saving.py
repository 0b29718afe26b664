"""Saving honestly (dtypes match config.json), push_to_hub's passthrough, transformers' loading keywords."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, save_torch, torch_random_init
from tests.tiny_configs import TINY_CAUSAL
from trlax import FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead, UnsupportedModelError
from trlax.checkpoint.reader import CheckpointReader

VOCAB = 101


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    torch.manual_seed(0)
    pt = torch_random_init(transformers.AutoModelForCausalLM.from_config(TINY_CAUSAL["qwen2"]()), std=0.1)
    return save_torch(pt.to(torch.bfloat16), tmp_path_factory.mktemp("bf16"))


def _written(folder: Path) -> tuple[str, set[str]]:
    config = json.loads((folder / "config.json").read_text())
    with CheckpointReader([folder / "model.safetensors"]) as reader:
        dtypes = {str(reader.get(k).dtype) for k in reader.keys() if not k.startswith("v_head.")}  # noqa: SIM118
    return config["dtype"], dtypes


def test_bf16_checkpoint_saves_bf16_by_default(bf16_folder, tmp_path):
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(bf16_folder)
    assert model.params["pretrained_model"]["model"]["embed_tokens"]["embedding"].dtype == jnp.float32
    model.save_pretrained(tmp_path / "default")
    assert _written(tmp_path / "default") == ("bfloat16", {"bfloat16"})
    size = (tmp_path / "default" / "model.safetensors").stat().st_size
    assert size < 1.1 * (bf16_folder / "model.safetensors").stat().st_size
    with CheckpointReader([tmp_path / "default" / "model.safetensors"]) as reader:
        assert reader.get("v_head.summary.weight").dtype == np.float32  # as TRL saves its head
    model.save_pretrained(tmp_path / "f32", dtype=jnp.float32)
    assert _written(tmp_path / "f32") == ("float32", {"float32"})
    # What transformers reads back is what the file says.
    pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "default")
    assert next(pt.parameters()).dtype == torch.bfloat16


def test_param_dtype_auto_keeps_the_checkpoint_dtype(bf16_folder, tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(bf16_folder, param_dtype="auto")
    assert model.params["model"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    fresh = FlaxAutoModelForCausalLM.from_config(TINY_CAUSAL["gpt2"]())
    fresh.save_pretrained(tmp_path)
    assert _written(tmp_path) == ("float32", {"float32"})


@pytest.mark.parametrize("declared", ["float32", "float16", None])
def test_dtype_auto_reads_config_json_first_as_transformers_does(bf16_folder, tmp_path, declared):
    # A bf16 file whose config.json says another dtype (or none): transformers' "auto" takes the config's.
    shutil.copytree(bf16_folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = declared
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype
    assert expected == getattr(torch, declared or "bfloat16")
    for cls in (FlaxAutoModelForCausalLM, FlaxAutoModelForCausalLMWithValueHead):
        model = cls.from_pretrained(tmp_path, dtype="auto", param_dtype="auto")
        lm = model.pretrained_model if cls is FlaxAutoModelForCausalLMWithValueHead else model
        assert jnp.dtype(lm.dtype).name == str(expected).removeprefix("torch.")
        assert lm.params["model"]["embed_tokens"]["embedding"].dtype == lm.dtype
        assert lm.storage_dtype == jnp.bfloat16  # what the file holds: a save writes it by default


def test_transformers_loading_keywords(bf16_folder):
    with pytest.warns(FutureWarning, match="torch_dtype"):
        model = FlaxAutoModelForCausalLM.from_pretrained(bf16_folder, torch_dtype=torch.bfloat16)
    assert model.dtype == jnp.bfloat16
    with pytest.warns(FutureWarning, match="torch_dtype"):
        wrapper = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(bf16_folder, torch_dtype="auto")
    assert wrapper.pretrained_model.dtype == jnp.bfloat16
    for name, says in (("device_map", "mesh="), ("attn_implementation", "XLA attention"),
                       ("low_cpu_mem_usage", "memory-mapped")):
        with pytest.warns(UserWarning, match=f"{name}=.*ignored.*{says}"):
            FlaxAutoModelForCausalLMWithValueHead.from_pretrained(bf16_folder, **{name: "auto"})
    for name, value in (("quantization_config", {"load_in_4bit": True}), ("load_in_8bit", True),
                        ("load_in_4bit", True), ("trust_remote_code", True)):
        with pytest.raises(UnsupportedModelError, match=name):
            FlaxAutoModelForCausalLM.from_pretrained(bf16_folder, **{name: value})
        with pytest.raises(UnsupportedModelError, match=name):
            FlaxAutoModelForCausalLMWithValueHead.from_pretrained(bf16_folder, **{name: value})
    FlaxAutoModelForCausalLM.from_pretrained(bf16_folder, trust_remote_code=False)


class LocalHub:
    """A stand-in for huggingface_hub.HfApi: repos are folders, commits are recorded."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []

    def _repo(self, repo_id: str, revision: str | None = None) -> Path:
        return self.root / repo_id.replace("/", "--") / (revision or "main")

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        self._repo(repo_id).mkdir(parents=True, exist_ok=True)

    def create_branch(self, repo_id, *, branch, **kwargs):
        self.calls.append(("create_branch", repo_id, {"branch": branch, **kwargs}))
        if not self._repo(repo_id, branch).exists():
            shutil.copytree(self._repo(repo_id), self._repo(repo_id, branch))

    def file_exists(self, repo_id, filename, *, revision=None, **kwargs):
        return (self._repo(repo_id, revision) / filename).exists()

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kwargs):
        return str(self._repo(repo_id, revision) / filename)

    def upload_folder(self, *, repo_id, folder_path, revision=None, **kwargs):
        self.calls.append(("upload_folder", repo_id, {"revision": revision, **kwargs}))
        shutil.copytree(folder_path, self._repo(repo_id, revision), dirs_exist_ok=True)
        return f"commit on {revision or 'main'}"


def test_push_to_hub_passes_everything_through(bf16_folder, tmp_path):
    hub = LocalHub(tmp_path / "hub")
    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(bf16_folder)
    result = model.push_to_hub("me/tiny", api=hub, max_shard_size="20KB", commit_message="msg",
                               commit_description="desc", private=True, token="tok", revision="dev",
                               tags=["rlhf", "trl"])
    assert result == "commit on dev"
    assert hub.calls[0] == ("create_repo", "me/tiny", {"token": "tok", "private": True, "exist_ok": True})
    assert hub.calls[1] == ("create_branch", "me/tiny", {"branch": "dev", "token": "tok", "exist_ok": True})
    upload = hub.calls[2][2]
    assert upload == {"revision": "dev", "token": "tok", "commit_message": "msg", "commit_description": "desc",
                      "create_pr": False}
    repo = hub._repo("me/tiny", "dev")
    assert (repo / "model.safetensors.index.json").exists()  # max_shard_size reached save_pretrained
    card = (repo / "README.md").read_text()
    assert "- rlhf" in card and "- trl" in card
    loaded = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(repo, strict=True)
    ids, _ = batch(VOCAB, "none", low=2)
    np.testing.assert_allclose(np.asarray(loaded(ids)[2]), np.asarray(model(ids)[2]), atol=1e-6)  # lossless
    assert json.loads((repo / "config.json").read_text())["dtype"] == "bfloat16"
    # A second push with a PR keeps the card's tags and adds new ones; no branch is created for a PR.
    hub.calls.clear()
    model.pretrained_model.push_to_hub("me/tiny", api=hub, revision="dev", create_pr=True, tags=["ppo"],
                                       dtype=jnp.float32)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[1][2]["create_pr"] is True
    card = (repo / "README.md").read_text()
    assert "- rlhf" in card and "- ppo" in card


def test_transformers_saving_and_forward_keywords(bf16_folder, tmp_path):
    """What TRL and accelerate scripts pass: accepted where trlax does that anyway, refused naming them."""
    from trlax.errors import TrlaxTypeError

    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(bf16_folder, summary_dropout_prob=0.0)
    model.save_pretrained(tmp_path / "safe", safe_serialization=True)
    assert (tmp_path / "safe" / "model.safetensors").is_file()
    model.pretrained_model.save_pretrained(tmp_path / "lm", safe_serialization=True, push_to_hub=False)
    with pytest.warns(UserWarning, match="is_main_process=True is ignored"):
        model.save_pretrained(tmp_path / "main", is_main_process=True)
    for kwargs, error, match in [({"safe_serialization": False}, UnsupportedModelError, "writes model.safetensors"),
                                 ({"state_dict": {"a": 1}}, UnsupportedModelError, "pass params="),
                                 ({"state_dict": {}}, UnsupportedModelError, "pass params="),  # saved the params
                                 ({"push_to_hub": True}, UnsupportedModelError, "call push_to_hub"),
                                 ({"shard_size": 1}, TrlaxTypeError, "unexpected keyword argument 'shard_size'")]:
        with pytest.raises(error, match=match):
            model.save_pretrained(tmp_path / "refused", **kwargs)
        assert not (tmp_path / "refused").exists()
    ids, mask = batch(101, "none")
    np.testing.assert_array_equal(model(ids, mask, use_cache=False)[0], model(ids, mask)[0])
    logits, _, values, cache = model(ids, mask, return_past_key_values=True)  # TRL's 4-tuple
    # Two compiled programs (one also writes a cache): equal up to XLA's fusion choices, a few float32 ulps.
    np.testing.assert_allclose(logits, model(ids, mask)[0], rtol=0, atol=1e-6)
    assert len(cache) == model.config.num_hidden_layers and cache[0]["k"].shape[2] == ids.shape[1]


def test_a_sharded_value_head_save_warns_that_trl_cannot_read_it(bf16_folder, tmp_path, caplog):
    """TRL 1.12 fails on any local sharded value-head folder (its own saves too): it asks the hub for the shard
    files. The save says so; if TRL learns to read them, this test fails and the warning goes."""
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead

    model = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(bf16_folder)
    with caplog.at_level("WARNING", logger="trlax"):
        model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert "TRL 1.12's from_pretrained cannot" in caplog.text
    with pytest.raises(Exception, match="Repo id must|HFValidationError|repo_id"):  # noqa: PT011 - TRL's own error
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "sharded"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="trlax"):
        model.save_pretrained(tmp_path / "single")
    assert "TRL" not in caplog.text
