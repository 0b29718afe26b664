"""`trlax info`: architecture, sizes by dtype, value head, adapters and reference sharing, from headers only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

from tests.helpers import save_torch, torch_random_init
from tests.hub_stand_in import lay_out_hub_cache
from tests.tiny_configs import gpt2, llama, t5
from trlax import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForCausalLMWithValueHead,
    FlaxAutoModelForSequenceClassification,
    create_reference_model,
)
from trlax.checkpoint.convert import to_orbax
from trlax.cli import main
from trlax.cli.info import model_info


def _trl_bf16_checkpoint(config: transformers.PretrainedConfig, folder: Path) -> Path:
    """A bfloat16 LM plus a float32 TRL value head, saved the way TRL saves (LM keys + v_head.summary.*)."""
    torch.manual_seed(0)
    lm = torch_random_init(transformers.AutoModelForCausalLM.from_config(config), std=0.1).to(torch.bfloat16)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    head = torch.nn.Linear(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd, 1)
    state["v_head.summary.weight"], state["v_head.summary.bias"] = head.weight.detach(), head.bias.detach()
    return save_torch(lm, folder, state_dict=state, max_shard_size="40KB")  # sharded: the index is read too


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("make_config", [gpt2, llama], ids=["gpt2", "llama"])
def test_sizes_by_dtype_and_value_head(make_config, tmp_path: Path, capsys) -> None:
    config = make_config()
    folder = _trl_bf16_checkpoint(config, tmp_path / "ck")
    assert (folder / "model.safetensors.index.json").exists()
    code, out, _ = _run(["info", str(folder), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    lm = FlaxAutoModelForCausalLM.from_pretrained(folder)
    assert info["parameters"] == lm.num_params()  # every LM tensor, tied copies once, value head excluded
    h = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    assert info["by_dtype"]["bfloat16"] == {"params": lm.num_params(), "bytes": 2 * lm.num_params(),
                                            "tensors": len(lm.key_table())}
    assert info["by_dtype"]["float32"] == {"params": h + 1, "bytes": 4 * (h + 1), "tensors": 2}  # the head
    assert info["value_head"] == {"shape": [1, h], "dtype": "float32"}
    assert info["adapter"] is None
    arch = info["architecture"]
    assert arch["model_type"] == config.model_type and arch["trlax_support"] == "yes"
    assert arch["layers"] == 2 and arch["hidden_size"] == h and arch["vocab_size"] == 101
    assert info["reference"]["layers"] == 2 and "shared_names" not in info["reference"]
    # The text report says the same.
    code, text, _ = _run(["info", str(folder)], capsys)
    assert f"architecture: {config.model_type} (" in text and "trlax:        supported" in text
    n = lm.num_params()
    line = rf"\n    bfloat16 +{n:,} params +{2 * n / 1000:.1f}KB  in {len(lm.key_table())} tensors\n"
    assert re.search(line, text), text
    assert f"value head:   yes, TRL's v_head.summary.weight [1, {h}] float32" in text
    assert "pass --num-shared-layers N" in text


def test_shared_names_are_what_create_reference_model_shares(tmp_path: Path) -> None:
    save_torch(transformers.AutoModelForCausalLM.from_config(gpt2()), tmp_path)
    for num_shared_layers in (0, 1):
        info = model_info(str(tmp_path), num_shared_layers)
        policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
        ref = create_reference_model(policy, num_shared_layers=num_shared_layers)
        by_path = {rule.path: key for key, rule in policy.pretrained_model.key_table().items()}
        leaves = jax.tree_util.tree_leaves_with_path(policy.params["pretrained_model"])
        shared = [by_path[tuple(k.key for k in path)] for (path, a), b in
                  zip(leaves, jax.tree_util.tree_leaves(ref.params["pretrained_model"]), strict=True) if a is b]
        names = info["reference"]["shared_names"]
        assert sorted(names) == sorted(shared) and names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
        assert len(names) == 2 + 12 * num_shared_layers  # embeddings, then 12 tensors per GPT-2 block
        assert info["reference"]["shared_params"] == sum(
            int(np.prod(leaf.shape)) for path, leaf in leaves if by_path[tuple(k.key for k in path)] in names)


def test_seq2seq_uses_the_decoder_block_pattern(tmp_path: Path, capsys) -> None:
    save_torch(transformers.T5ForConditionalGeneration(t5()), tmp_path)
    code, text, _ = _run(["info", str(tmp_path), "-n", "2"], capsys)
    assert code == 0
    assert "encoder-decoder (seq2seq) LM" in text and "layer pattern 'decoder.block.{layer}', 3 layers" in text
    assert "    decoder.block.1.layer.0.SelfAttention.q.weight" in text
    assert "decoder.block.2." not in text


def test_adapter_folders(tmp_path: Path, capsys) -> None:
    config = gpt2()
    torch.manual_seed(0)
    save_torch(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "base")
    # A PEFT reward adapter, as TRL's reward modelling saves it: LoRA + the full score head.
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=1)
    peft.get_peft_model(rm, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["c_attn"])
                        ).save_pretrained(str(tmp_path / "rm"))
    code, text, _ = _run(["info", str(tmp_path / "rm")], capsys)
    assert code == 0
    assert "adapters:     LORA reward adapter (SEQ_CLS with a score head), task SEQ_CLS, r=4, lora_alpha=16, " \
           "2 adapted layers" in text
    assert "saved in full: ['score']" in text and "value head:   no" in text
    # A LoRA policy saved by trlax: PEFT's adapter files plus TRL's value head beside them.
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
        tmp_path / "base", peft_config={"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]})
    policy.save_pretrained(tmp_path / "policy")
    info = model_info(str(tmp_path / "policy"))
    assert info["adapter"]["role"] == "policy adapter" and info["adapter"]["adapted_layers"] == 4
    assert info["adapter"]["base_model_name_or_path"] == str(tmp_path / "base")
    assert info["value_head"] == {"shape": [1, 32], "dtype": "float32"}
    assert info["parameters"] == 2 * sum(2 * 32 + out * 2 for out in (96, 128))  # 2 layers x (A [2, 32] + B [out, 2])
    code, _, err = _run(["info", str(tmp_path / "policy"), "-n", "1"], capsys)  # -n was ignored
    assert code == 1 and "is a PEFT adapter folder: --num-shared-layers applies to a full model" in err


def test_parameters_leave_out_buffers_and_tied_copies(tmp_path: Path) -> None:
    """A file with GPT-2's attn.bias / attn.masked_bias buffers (the hub's openai-community/gpt2 has them), or
    torch.save's state dict with the tied lm_head.weight: `parameters` counted them (38,946 and 33,984 where
    the model has 30,752)."""
    lm = transformers.GPT2LMHeadModel(gpt2())
    state = {k.removeprefix("transformer."): v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    for i in range(lm.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_torch(lm, tmp_path / "buffers", state_dict=state)
    save_torch(lm, tmp_path / "tied", state_dict=lm.state_dict(), safe_serialization=False)
    for name in ("buffers", "tied"):
        assert model_info(str(tmp_path / name))["parameters"] == lm.num_parameters() == \
            FlaxAutoModelForCausalLM.from_pretrained(tmp_path / name).num_params(), name


def test_broken_adapter_and_orbax_folders_are_errors_and_trl_heads_are_found(tmp_path: Path, capsys) -> None:
    """An adapter folder without weights was a valid 0-parameter adapter, a non-object adapter_config.json an
    "unexpected AttributeError", an Orbax folder without params/ a 0-parameter model; TRL's LoRA policy save (its
    value head in pytorch_model.bin) was said to have no value head."""
    save_torch(transformers.AutoModelForCausalLM.from_config(gpt2()), tmp_path / "base")
    policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "base", peft_config={"r": 2})
    policy.save_pretrained(tmp_path / "trl")
    safetensors_head = tmp_path / "trl" / "model.safetensors"
    head = safetensors.numpy.load_file(safetensors_head)
    torch.save({k: torch.from_numpy(v) for k, v in head.items()}, tmp_path / "trl" / "pytorch_model.bin")
    safetensors_head.unlink()  # TRL writes the head to pytorch_model.bin
    assert model_info(str(tmp_path / "trl"))["value_head"] == {"shape": [1, 32], "dtype": "float32"}
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "a_list").mkdir()
    (tmp_path / "a_list" / "adapter_config.json").write_text("[1, 2]")
    to_orbax(tmp_path / "base", tmp_path / "orbax", progress=False)
    shutil.rmtree(tmp_path / "orbax" / "params")
    for name, message in (("no_weights", "has adapter_config.json but no adapter weights"),
                          ("a_list", "a_list/adapter_config.json must be a JSON object, not a list"),
                          ("orbax", "has no params/ (an incomplete copy?)")):
        code, _, err = _run(["info", str(tmp_path / name)], capsys)
        assert code == 1 and message in err and err.startswith("trlax info: error: "), err


def test_hub_id_reads_headers_without_downloading(tmp_path: Path, monkeypatch, capsys) -> None:
    """Online, a hub id not in the cache is described from the hub's safetensors headers alone."""
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    import trlax.cli.info

    gpt2().save_pretrained(tmp_path)  # config.json only
    tensors = {"transformer.wte.weight": TensorInfo("BF16", [101, 32], (0, 6464)),
               "transformer.wpe.weight": TensorInfo("F16", [64, 32], (6464, 10560))}
    metadata = SafetensorsRepoMetadata(None, False, dict.fromkeys(tensors, "model.safetensors"),
                                       {"model.safetensors": SafetensorsFileMetadata({}, tensors)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.get_safetensors_metadata", lambda repo, **kw: metadata)
    monkeypatch.setattr(trlax.cli.info, "fetch_file", lambda src, name, opts: tmp_path / name if name == "config.json"
                        else None)

    def no_download(*args, **kwargs):
        raise AssertionError("weights were fetched")

    monkeypatch.setattr(trlax.cli.info, "resolve_checkpoint", no_download)
    info = model_info("someone/tiny-gpt2")
    assert info["by_dtype"] == {"bfloat16": {"params": 3232, "bytes": 6464, "tensors": 1},
                                "float16": {"params": 2048, "bytes": 4096, "tensors": 1}}
    assert info["value_head"] is None and info["architecture"]["model_type"] == "gpt2"


def test_unsupported_architecture_is_reported_not_fatal(tmp_path: Path, capsys) -> None:
    transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    safetensors.numpy.save_file({"bert.embeddings.word_embeddings.weight": np.zeros((4, 32), np.float16)},
                                str(tmp_path / "model.safetensors"))
    code, text, _ = _run(["info", str(tmp_path)], capsys)
    assert code == 0
    assert "architecture: bert" in text and "trlax:        no: model_type 'bert' is not supported" in text
    assert "float16" in text and "reference:" not in text
    assert model_info(str(tmp_path))["architecture"]["kind"] == "another head: neither a causal nor a seq2seq LM"


@pytest.mark.parametrize(("save", "kind"), [
    (lambda c, d: transformers.GPT2ForSequenceClassification(c).save_pretrained(d), "sequence classifier (1 label"),
    (lambda c, d: transformers.GPT2LMHeadModel(c).save_pretrained(d), "causal LM"),
    (lambda c, d: c.save_pretrained(d), "causal LM"),  # no `architectures`: gpt2 has a causal-LM class
])
def test_kind_is_the_checkpoint_head(tmp_path: Path, save, kind) -> None:
    config = gpt2()
    config.num_labels = 1
    save(config, tmp_path)
    assert model_info(str(tmp_path))["architecture"]["kind"].startswith(kind)


def test_a_classifier_counts_its_score_head(tmp_path: Path) -> None:
    """`parameters` of a reward model counted the causal LM's (26,912 where the classifier holds 26,944)."""
    config = gpt2()
    config.num_labels = 1
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    pt = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model_info(str(tmp_path))["parameters"] == pt.num_parameters() == \
        FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path).num_params()


def test_cache_dir_and_local_files_only_read_a_hub_cache(tmp_path: Path, capsys) -> None:
    save_torch(transformers.AutoModelForCausalLM.from_config(gpt2()), tmp_path / "ck")
    lay_out_hub_cache(tmp_path / "cache", "org/tiny", tmp_path / "ck")
    code, text, _ = _run(["info", "org/tiny", "--cache-dir", str(tmp_path / "cache"), "--local-files-only",
                          "--json"], capsys)
    assert code == 0 and json.loads(text)["parameters"] == model_info(str(tmp_path / "ck"))["parameters"]


def test_errors_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    save_torch(transformers.AutoModelForCausalLM.from_config(gpt2()), tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("")
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cases = [
        (["info", str(tmp_path / "missing")], 1, "is not a folder"),
        (["info", "afile"], 1, "afile is not a folder"),  # a relative file was asked of the hub
        (["info", "nobody/no-such-model"], 1, "is not in the hub cache"),  # tests run offline
        (["info", str(weird)], 1, "cannot read the config of"),
        (["info", str(tmp_path / "ck"), "-n", "2"], 1, "--num-shared-layers 2 is out of range: this model has 2"),
        (["info", str(tmp_path / "ck"), "-n", "one"], 2, "argument --num-shared-layers/-n: invalid int value"),
        (["info"], 2, "the following arguments are required: PATH_OR_HUB_ID"),
    ]
    for argv, want, message in cases:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == want and err.count("\n") == 1 and message in err, (argv, err)
        assert err.startswith("trlax info: error: "), err
