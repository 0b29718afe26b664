"""`trlax convert`: HF / PyTorch checkpoints (with or without TRL's value head) <-> Orbax model folders."""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import batch, save_torch, torch_random_init
from tests.tiny_configs import gpt2, llama
from trlax import (
    CheckpointError,
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    LoraConfig,
)
from trlax.checkpoint.convert import is_orbax_model, load_orbax, to_hf, to_orbax
from trlax.checkpoint.reader import CheckpointReader
from trlax.cli import main
from trlax.errors import CheckpointWriteError
from trlax.value_head import value_head_hidden_size


def _torch_checkpoint(config: transformers.PretrainedConfig, folder: Path, value_head: bool, **save_kwargs) -> Path:
    """A PyTorch checkpoint as transformers (or, with `value_head`, TRL) saves it."""
    torch.manual_seed(0)
    lm = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    if value_head:
        head = torch.nn.Linear(value_head_hidden_size(config), 1)
        state["v_head.summary.weight"] = head.weight.detach().clone()
        state["v_head.summary.bias"] = head.bias.detach().clone()
    return save_torch(lm, folder, state_dict=state, **save_kwargs)


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    with CheckpointReader(files) as reader:
        return {key: np.array(reader.get(key)) for key in reader.keys()}  # noqa: SIM118 - not a dict


@pytest.mark.parametrize(("make_config", "value_head", "save_kwargs"), [
    (gpt2, True, {"max_shard_size": "20KB"}),  # TRL layout, sharded safetensors
    (llama, False, {"safe_serialization": False}),  # plain LM, pytorch_model.bin
])
def test_convert_round_trip(make_config, value_head, save_kwargs, tmp_path: Path, capsys) -> None:
    config = make_config()
    src = _torch_checkpoint(config, tmp_path / "src", value_head, **save_kwargs)
    assert main(["convert", str(src), str(tmp_path / "orbax")]) == 0
    assert is_orbax_model(tmp_path / "orbax")
    err = capsys.readouterr().err
    assert "reading" in err and "writing" in err  # progress bars

    restored = load_orbax(tmp_path / "orbax")
    ids, mask = batch(config.vocab_size, "right", low=2)
    if value_head:
        reference = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(src, strict=True)
        assert isinstance(restored, FlaxAutoModelForCausalLMWithValueHead)
        for got, want in zip(restored(ids, mask), reference(ids, mask), strict=True):
            np.testing.assert_array_equal(np.asarray(got) if got is not None else None,
                                          np.asarray(want) if want is not None else None)
    else:
        reference = FlaxAutoModelForCausalLM.from_pretrained(src)
        assert not hasattr(restored, "pretrained_model")
        np.testing.assert_array_equal(restored(ids, mask).logits, reference(ids, mask).logits)

    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--max-shard-size", "30KB"]) == 0
    assert "gathering" in capsys.readouterr().err
    want, got = _tensors(src), _tensors(tmp_path / "hf")
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # bit-exact both ways
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()


def test_convert_from_hub_id_and_dropping_the_head(tmp_path: Path) -> None:
    """A hub id resolves through huggingface_hub's cache (offline here); --value-head no drops TRL's head."""
    snapshot = tmp_path / "cache" / "models--someone--tiny-gpt2" / "snapshots" / ("a" * 40)
    _torch_checkpoint(gpt2(), snapshot, value_head=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    args = ["convert", "someone/tiny-gpt2", str(tmp_path / "orbax"), "--cache-dir", str(tmp_path / "cache"),
            "--local-files-only", "--value-head", "no", "--dtype", "bfloat16", "--no-progress"]
    assert main(args) == 0
    model = load_orbax(tmp_path / "orbax")
    assert not hasattr(model, "pretrained_model")
    assert model.params["transformer"]["wte"]["embedding"].dtype == np.dtype("bfloat16")


def test_convert_errors(tmp_path: Path, capsys) -> None:
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=False)
    assert main(["convert", str(src), str(tmp_path / "out"), "--value-head", "yes"]) == 1
    assert "has no TRL value head" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "full")]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 1
    assert "is not a trlax Orbax model folder" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is not a trlax Orbax model folder"):
        load_orbax(src)
    # An adapter folder was "no config.json in ... (save the model with save_pretrained)".
    FlaxAutoModelForCausalLMWithValueHead.from_pretrained(src, peft_config={"r": 2}).save_pretrained(tmp_path / "ad")
    assert main(["convert", str(tmp_path / "ad"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "is a PEFT adapter (it has adapter_config.json), not a full model: convert its base" in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_on_an_orbax_base_warns_and_its_reload_names_the_orbax_folder(tmp_path: Path, caplog) -> None:
    """A LoRA policy over a load_orbax model saved an adapter naming the Orbax folder as its base, which nothing
    loads; the reload said "no weights in ..." without a word about Orbax."""
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=False)
    to_orbax(src, tmp_path / "orbax", progress=False)
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        load_orbax(tmp_path / "orbax"), peft_config=LoraConfig(r=2, target_modules=["c_attn"]))
    with caplog.at_level(logging.WARNING, logger="trlax"):
        policy.save_pretrained(tmp_path / "adapter")
    assert "an Orbax model folder, which PEFT, TRL and from_pretrained cannot load" in caplog.text
    with pytest.raises(CheckpointError, match="is an Orbax model folder .* load it with trlax.load_orbax"):
        FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="is an Orbax model folder"):
        FlaxAutoModelForCausalLM.from_pretrained(tmp_path / "orbax")


def test_a_damaged_orbax_marker_is_a_checkpoint_error(tmp_path: Path, capsys) -> None:
    """A marker that is not JSON, or lacks its fields, raised a raw JSONDecodeError / KeyError (`trlax convert`:
    "unexpected JSONDecodeError ... please report it")."""
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=False)
    to_orbax(src, tmp_path / "orbax", progress=False)
    marker = tmp_path / "orbax" / "trlax_orbax.json"
    good = marker.read_text()
    for text, problem in (("{", "cannot be read"), ("[]", "is not a trlax-orbax-model marker"),
                          ('{"format": "trlax-orbax-model", "value_head": false}', "lacks a valid param_dtype"),
                          (good.replace('"float32"', '"int8"'), "lacks a valid param_dtype"),
                          (good.replace('"float32"', '"floaty"'), "lacks a valid param_dtype"),
                          (good.replace("false", '"no"'), "or value_head")):
        marker.write_text(text)
        with pytest.raises(CheckpointError, match=problem):
            load_orbax(tmp_path / "orbax")
        assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--to", "hf"]) == 1
        assert problem in capsys.readouterr().err
    marker.write_text(good)
    load_orbax(tmp_path / "orbax")


def test_round_trip_keeps_dtype_statement_and_generation_config(tmp_path: Path, capsys) -> None:
    """config.json states what the files hold (bf16 here, the source's was float32), and the checkpoint's
    generation_config.json survives HF -> Orbax -> HF."""
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=True)
    settings = transformers.GenerationConfig(eos_token_id=[1, 7], do_sample=True, temperature=0.6, max_new_tokens=5)
    settings.save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "orbax"), "--dtype", "bfloat16"]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    with CheckpointReader([tmp_path / "hf" / "model.safetensors"]) as reader:
        stored = {str(reader.dtype(k)) for k in reader.keys() if not k.startswith("v_head.")}  # noqa: SIM118
    assert stored == {"bfloat16"}
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16
    again = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (again.eos_token_id, again.do_sample, again.temperature, again.max_new_tokens) == ([1, 7], True, 0.6, 5)


def test_convert_refuses_what_it_would_ignore_or_clobber(tmp_path: Path, capsys) -> None:
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=False)
    assert main(["convert", str(src), str(tmp_path / "orbax"), "--max-shard-size", "10KB"]) == 1
    assert "--max-shard-size applies to HF output only" in capsys.readouterr().err
    assert not (tmp_path / "orbax").exists()
    assert main(["convert", str(src), str(tmp_path / "orbax")]) == 0
    for flags in (["--dtype", "bfloat16"], ["--value-head", "no"]):
        assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf"), *flags]) == 1
        assert f"{flags[0]} applies to Orbax output only" in capsys.readouterr().err
        assert not (tmp_path / "hf").exists()
    before = sorted(p.name for p in (tmp_path / "orbax").iterdir())
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "orbax")]) == 1
    assert "is the Orbax folder SRC itself" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "orbax").iterdir()) == before
    # Multi-host flags without --distributed converted on one process, as if they were not there.
    assert main(["convert", str(src), str(tmp_path / "o2"), "--num-processes", "4", "--process-id", "3"]) == 1
    assert "--num-processes, --process-id only apply with --distributed" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_convert_refuses_a_dst_inside_or_around_its_src(tmp_path: Path, capsys) -> None:
    """`trlax convert ORBAX ORBAX/params` wrote HF files among Orbax's own (rc 0). A DST holding SRC is fine:
    the save keeps the Orbax folder among its entries."""
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=False)
    assert main(["convert", str(src), str(tmp_path / "orbax")]) == 0
    orbax = tmp_path / "orbax"
    for source, target, match in ((src, src / "orbax", "lies inside SRC"),
                                  (orbax, orbax / "params", "lies inside the Orbax folder SRC")):
        before = sorted(p.name for p in source.iterdir())
        assert main(["convert", str(source), str(target)]) == 1
        assert f"{match} {source}; convert into a folder outside it" in capsys.readouterr().err
        assert sorted(p.name for p in source.iterdir()) == before
    assert main(["convert", str(orbax), str(tmp_path)]) == 0
    assert is_orbax_model(orbax) and (tmp_path / "model.safetensors").is_file()


def test_a_failed_orbax_write_keeps_nothing_and_names_the_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """A full disk: ~300 lines of Orbax's thread logs and tracebacks, then "unexpected ValueError", and a
    half-written folder left that refused the retry ("exists and is not empty")."""
    import orbax.checkpoint as ocp

    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=False)
    real_save = ocp.StandardCheckpointer.save

    def disk_full(self, directory, *args, **kwargs):
        (Path(directory).parent / "params.orbax-checkpoint-tmp" / "ocdbt.process_0").mkdir(parents=True)
        raise ValueError("OUT_OF_RANGE: Error writing in OCDBT database: File too large")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", disk_full)
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the Orbax model folder" in err and "File too large" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointWriteError):  # an OSError too, as the write's own error was
        to_orbax(src, tmp_path / "out", progress=False)
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", lambda *a, **k: (_ for _ in ()).throw(TimeoutError()))
    with pytest.raises(CheckpointWriteError, match=r"\(TimeoutError\); nothing was kept"):  # an empty message
        to_orbax(src, tmp_path / "out", progress=False)
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
    assert main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    # A folder whose marker says float64 params (written before trlax refused float64 models) loads as JAX holds
    # it without x64: float32.
    marker = json.loads((tmp_path / "out" / "trlax_orbax.json").read_text())
    (tmp_path / "out" / "trlax_orbax.json").write_text(json.dumps({**marker, "param_dtype": "float64"}))
    assert load_orbax(tmp_path / "out").param_dtype == np.float32


def test_python_dash_m_trlax(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["trlax", "convert", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("trlax", run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage: trlax convert" in capsys.readouterr().out


def test_a_bf16_checkpoint_comes_back_bf16_through_float32_orbax_params(tmp_path: Path) -> None:
    """to_orbax keeps float32 params by default; to_hf wrote them as float32, doubling a bf16 checkpoint."""
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=True)
    FlaxAutoModelForCausalLMWithValueHead.from_pretrained(src).save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    to_orbax(tmp_path / "bf16", tmp_path / "orbax", progress=False)
    assert load_orbax(tmp_path / "orbax").params["v_head"]["summary"]["kernel"].dtype == np.float32
    to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    with CheckpointReader([tmp_path / "hf" / "model.safetensors"]) as reader:
        lm = {str(reader.dtype(k)) for k in reader.keys() if not k.startswith("v_head.")}  # noqa: SIM118
        head = {str(reader.dtype(k)) for k in reader.keys() if k.startswith("v_head.")}  # noqa: SIM118
    assert lm == {"bfloat16"} and head == {"float32"}
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16
    sizes = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("bf16", "hf")}
    assert sizes["hf"] == sizes["bf16"]


def test_a_save_into_an_orbax_model_folder_replaces_its_orbax_params(tmp_path: Path) -> None:
    """save_pretrained into a folder `to_orbax` wrote kept its marker and params/: load_orbax and `trlax convert`
    then read the old Orbax params beside the new config.json (the exported logits were the old model's)."""
    src = _torch_checkpoint(gpt2(), tmp_path / "src", value_head=False)
    folder = to_orbax(src, tmp_path / "model", progress=False)
    model = FlaxAutoModelForCausalLM.from_pretrained(src)
    model.params = jax.tree_util.tree_map(lambda leaf: leaf * 0.5, model.params)  # a fine-tuned model
    model.save_pretrained(folder)
    assert not is_orbax_model(folder) and not (folder / "params").exists()
    ids, mask = batch(model.vocab_size, "left")
    again = FlaxAutoModelForCausalLM.from_pretrained(folder)
    np.testing.assert_array_equal(np.asarray(again(ids, attention_mask=mask).logits),
                                  np.asarray(model(ids, attention_mask=mask).logits))
