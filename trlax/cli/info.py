"""`trlax info PATH_OR_HUB_ID`: what a checkpoint holds, read from config.json and tensor headers only.

Reports the architecture (and whether trlax implements it), parameter count and bytes per
stored dtype, whether TRL's value head and PEFT adapters are present, and which
parameters `create_reference_model(model, num_shared_layers=N)` would share. No weight is
loaded: safetensors headers are read (for a hub id not in the cache, through the hub's
header-only metadata API), so `info` is cheap even for a large checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import jax
import numpy as np
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM_TYPES

from trlax.checkpoint.convert import is_orbax_model
from trlax.checkpoint.hub import HubOptions, fetch_file, is_hub_id, resolve_checkpoint
from trlax.checkpoint.naming import hf_key
from trlax.checkpoint.reader import SAFETENSORS_DTYPES, SafetensorsFile, TorchBinFile, parse_json_object
from trlax.checkpoint.writer import ORBAX_PARAMS_DIR
from trlax.errors import CheckpointError, TrlaxError, UnsupportedModelError
from trlax.models.auto import (
    FlaxAutoModelForCausalLM,
    FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSequenceClassification,
)
from trlax.models.base import FlaxPreTrainedModel, load_config
from trlax.peft.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAMES, PEFT_PREFIX
from trlax.reference import count_layers, parameter_names, resolve_layer_pattern, shared_parameter_names

V_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")
Tensors = dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype name, shape)


# --- reading headers ------------------------------------------------------------------
def _header_table(files: list[Path]) -> Tensors:
    table: Tensors = {}
    for path in files:
        opened = SafetensorsFile(path) if str(path).endswith(".safetensors") else TorchBinFile(path)
        try:
            table.update({key: (np.dtype(opened.dtype(key)).name, tuple(opened.shape(key))) for key in opened.keys()})  # noqa: SIM118
        finally:
            opened.close()
    return table


def _hub_header_table(source: str, options: HubOptions) -> Tensors | None:
    """Tensor headers of a hub repo's safetensors without downloading them; None when unavailable."""
    if options.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    try:
        metadata = huggingface_hub.get_safetensors_metadata(source, revision=options.revision, token=options.token)
    except Exception:  # noqa: BLE001 - no metadata (offline, .bin only, ...): fall back to the files
        return None
    return {key: (SAFETENSORS_DTYPES[info.dtype].name, tuple(info.shape))
            for file in metadata.files_metadata.values() for key, info in file.tensors.items()}


def _orbax_tensors(folder: Path) -> Tensors:
    """HF names, dtypes and (HF) shapes of the params of an Orbax model folder, from Orbax's metadata."""
    import orbax.checkpoint as ocp  # seconds to import: only for an Orbax folder

    if not (folder / ORBAX_PARAMS_DIR).is_dir():
        raise CheckpointError(f"the Orbax model folder {folder} has no {ORBAX_PARAMS_DIR}/ (an incomplete copy?); "
                              "re-create it with `trlax convert`")
    try:
        metadata = ocp.StandardCheckpointer().metadata((folder / ORBAX_PARAMS_DIR).absolute())
    except Exception as e:  # noqa: BLE001 - Orbax raises bare exceptions for a damaged folder
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"cannot read the params metadata of the Orbax model folder {folder} ({reason}); "
                              "re-create it with `trlax convert`") from None
    tree = getattr(metadata, "item_metadata", metadata)
    table: Tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(str(getattr(k, "key", k)) for k in path)
        shape = tuple(leaf.shape)
        if names[-1] == "kernel":  # HF stores Linear weights [out, in]
            shape = shape[::-1]
        if names[0] == "v_head":
            key = hf_key(names[1:], prefix="v_head.")
        else:
            key = hf_key(names[1:] if names[0] == "pretrained_model" else names)
        table[key] = (np.dtype(leaf.dtype).name, shape)
    return table


def read_tensors(source: str, options: HubOptions) -> tuple[Path, Tensors]:
    """(config.json path, every stored tensor's dtype and shape) of a checkpoint folder or hub id."""
    if is_hub_id(source):
        config = fetch_file(source, "config.json", options)
        table = _hub_header_table(source, options) if config is not None else None
        if table is not None:
            return config, table
    resolved = resolve_checkpoint(source, options, require_weights=False)
    return resolved.config_file, _header_table(list(resolved.weight_files))


# --- summaries ------------------------------------------------------------------------
def by_dtype(tensors: Tensors) -> dict[str, dict[str, int]]:
    """{dtype: {"params": count, "bytes": bytes, "tensors": count}} over the stored tensors."""
    out: dict[str, dict[str, int]] = {}
    for dtype, shape in tensors.values():
        entry = out.setdefault(dtype, {"params": 0, "bytes": 0, "tensors": 0})
        numel = int(np.prod(shape))
        entry["params"] += numel
        entry["bytes"] += numel * np.dtype(dtype).itemsize
        entry["tensors"] += 1
    return out


def architecture(config: Any) -> dict[str, Any]:
    """model_type, transformers class, sizes, and whether (and how) trlax implements it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {}
    for label, names in (("layers", ("num_hidden_layers", "n_layer", "num_layers")),
                         ("hidden_size", ("hidden_size", "n_embd", "d_model")),
                         ("heads", ("num_attention_heads", "n_head", "num_heads")),
                         ("vocab_size", ("vocab_size",)),
                         ("max_positions", ("max_position_embeddings", "n_positions"))):
        value = next((getattr(text, n) for n in names if isinstance(getattr(text, n, None), int)), None)
        if value is not None:
            sizes[label] = value
    info = {"model_type": config.model_type, "architectures": list(getattr(config, "architectures", None) or []),
            "kind": model_kind(config), **sizes}
    try:
        _lm_object(config)
        info["trlax_support"] = "yes"
    except UnsupportedModelError as e:
        info["trlax_support"] = f"no: {e}"
    return info


def is_classifier(config: Any) -> bool:
    """Whether config.json's class (`architectures`) is a sequence classifier (a reward model)."""
    return (getattr(config, "architectures", None) or [""])[0].endswith("ForSequenceClassification")


def model_kind(config: Any) -> str:
    """What the checkpoint's head is: from transformers' class in config.json's `architectures`, else (a
    config without one) causal for the model types transformers has a causal-LM class for."""
    head = (getattr(config, "architectures", None) or [""])[0]
    if is_classifier(config):
        labels = getattr(config, "num_labels", 1)
        return f"sequence classifier ({labels} label{'s' * (labels != 1)}: a reward model)"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder (seq2seq) LM"
    if head.endswith(("ForCausalLM", "LMHeadModel")) or (not head and config.model_type in CAUSAL_LM_TYPES):
        return "causal LM"
    return "another head: neither a causal nor a seq2seq LM"


def _lm_object(config: Any) -> FlaxPreTrainedModel:
    """A trlax LM object for `config` with no params (enough for names and shapes)."""
    auto = FlaxAutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else FlaxAutoModelForCausalLM
    return auto.model_class(config)


def reference_sharing(config: Any, num_shared_layers: int | None, pattern: str | None = None) -> dict[str, Any]:
    """The layer pattern and count, and (for N) the names create_reference_model would share."""
    lm = _lm_object(config)
    names = parameter_names(lm)
    try:
        pattern = resolve_layer_pattern(names, pattern, lm.spec.layer_pattern)
    except ValueError as e:  # the custom pattern fits nothing: say so, the rest of the report stands
        return {"error": str(e)}
    layers = count_layers(names, pattern)
    out: dict[str, Any] = {"pattern": pattern, "layers": layers}
    if num_shared_layers is None:
        return out
    if not 0 <= num_shared_layers < layers:
        raise TrlaxError(f"--num-shared-layers {num_shared_layers} is out of range: this model has {layers} layers "
                         f"matching {pattern!r}, so N must be in [0, {layers - 1}]")
    shared = shared_parameter_names(names, num_shared_layers, pattern)
    table = lm.key_table()
    abstract = lm.abstract_params()
    leaf = {path: np.prod(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
            for path in [tuple(k.key for k in path)]}
    params = int(sum(leaf[table[name].path] for name in shared))
    out.update(num_shared_layers=num_shared_layers, shared_names=shared, shared_params=params,
               shared_of_total=params / max(1, int(sum(leaf.values()))))
    return out


def _adapter_info(raw: Mapping[str, Any], tensors: Tensors) -> dict[str, Any]:
    modules = sorted({key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for key in tensors if ".lora_A" in key})
    saved = sorted({key[len(PEFT_PREFIX):].rsplit(".", 1)[0] for key in tensors
                    if key.startswith(PEFT_PREFIX) and ".lora_" not in key})
    task = raw.get("task_type")
    role = ("reward adapter (SEQ_CLS with a score head)" if task == "SEQ_CLS" and "score" in saved
            else "policy adapter" if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else "adapter")
    return {"type": raw.get("peft_type", "LORA"), "role": role, "task_type": task, "r": raw.get("r"),
            "lora_alpha": raw.get("lora_alpha"), "target_modules": raw.get("target_modules"),
            "adapted_layers": len(modules), "saved_modules": saved,
            "base_model_name_or_path": raw.get("base_model_name_or_path")}


def model_info(source: str, num_shared_layers: int | None = None, options: HubOptions | None = None) -> dict[str, Any]:
    """Everything `trlax info` prints, as a JSON-ready dict."""
    options = options or HubOptions()
    source = str(source)
    adapter_config = (fetch_file(source, ADAPTER_CONFIG_NAME, options)
                      if Path(source).is_dir() or is_hub_id(source) else None)
    if adapter_config is not None:
        if num_shared_layers is not None:  # an adapter's reference is its base with the adapter off
            raise TrlaxError(f"{source} is a PEFT adapter folder: --num-shared-layers applies to a full model; run "
                             "`trlax info` on its base model for the layers a reference would share")
        return _adapter_folder_info(source, adapter_config, options)
    orbax = is_orbax_model(source)
    if orbax:
        config_path, tensors = Path(source) / "config.json", _orbax_tensors(Path(source))
    else:
        config_path, tensors = read_tensors(source, options)
    config = load_config(config_path.parent, source)
    lm_tensors = {k: v for k, v in tensors.items() if not k.startswith("v_head.")}
    info: dict[str, Any] = {"source": source, "architecture": architecture(config),
                            "parameters": sum(d["params"] for d in by_dtype(lm_tensors).values()),
                            "by_dtype": by_dtype(tensors), "tensors": len(tensors)}
    if info["architecture"]["trlax_support"] == "yes" and tensors:
        # What the loaded model holds: no buffers (GPT-2's attn.bias), tied copies once; a classifier its score.
        model = (FlaxAutoModelForSequenceClassification.model_class(config) if is_classifier(config)
                 else _lm_object(config))
        info["parameters"] = model.num_params(model.abstract_params())
    if orbax:
        info["note"] = "an Orbax model folder (trlax convert); shapes as in HF checkpoints"
    elif not tensors:
        info["note"] = "no weight files (config only)"
    head = {k: tensors[k] for k in V_HEAD_KEYS if k in tensors}
    info["value_head"] = ({"shape": list(head[V_HEAD_KEYS[0]][1]), "dtype": head[V_HEAD_KEYS[0]][0]}
                          if V_HEAD_KEYS[0] in head else None)
    info["adapter"] = None
    if info["architecture"]["trlax_support"] == "yes":
        info["reference"] = reference_sharing(config, num_shared_layers)
    return info


def _adapter_folder_info(source: str, adapter_config: Path, options: HubOptions) -> dict[str, Any]:
    raw = parse_json_object(Path(adapter_config).read_bytes(), str(adapter_config))
    weights = next((path for name in ADAPTER_WEIGHTS_NAMES if (path := fetch_file(source, name, options))), None)
    if weights is None:
        raise CheckpointError(f"{source} has {ADAPTER_CONFIG_NAME} but no adapter weights "
                              f"({' or '.join(ADAPTER_WEIGHTS_NAMES)}); the adapter cannot be loaded")
    tensors = _header_table([Path(weights)])
    head: dict[str, Any] | None = None
    # A saved adapter policy keeps TRL's value head beside the adapter: trlax in model.safetensors, TRL in
    # pytorch_model.bin (read in that order, as from_pretrained reads them).
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = fetch_file(source, name, options)
        saved = _header_table([Path(path)]) if path is not None else {}
        if V_HEAD_KEYS[0] in saved:
            head = {"shape": list(saved[V_HEAD_KEYS[0]][1]), "dtype": saved[V_HEAD_KEYS[0]][0]}
            break
    return {"source": source, "architecture": None, "parameters": sum(d["params"] for d in by_dtype(tensors).values()),
            "by_dtype": by_dtype(tensors), "tensors": len(tensors), "value_head": head,
            "adapter": _adapter_info(raw, tensors)}


# --- printing -------------------------------------------------------------------------
def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n}{unit}"


def format_info(info: dict[str, Any]) -> str:
    lines = [f"source:       {info['source']}"]
    arch = info["architecture"]
    if arch is not None:
        sizes = ", ".join(f"{k.replace('_', ' ')} {arch[k]}" for k in
                          ("layers", "hidden_size", "heads", "vocab_size", "max_positions") if k in arch)
        classes = f" ({', '.join(arch['architectures'])})" if arch["architectures"] else ""
        lines += [f"architecture: {arch['model_type']}{classes}, {arch['kind']}; {sizes}",
                  f"trlax:        {'supported' if arch['trlax_support'] == 'yes' else arch['trlax_support']}"]
    lines.append(f"parameters:   {info['parameters']:,} ({_human(info['parameters'])})"
                 f"{' excluding the value head' if info['value_head'] else ''}, {info['tensors']} tensors stored")
    lines.append("  stored, by dtype:")
    for dtype, d in sorted(info["by_dtype"].items()):
        lines.append(f"    {dtype:<11} {d['params']:>14,} params  {_human(d['bytes'], 'B'):>8}  "
                     f"in {d['tensors']} tensors")
    if info.get("note"):
        lines.append(f"  ({info['note']})")
    head = info["value_head"]
    lines.append(f"value head:   yes, TRL's v_head.summary.weight {head['shape']} {head['dtype']}" if head
                 else "value head:   no (from_pretrained initialises one, with a warning)")
    adapter = info["adapter"]
    if adapter is None:
        lines.append("adapters:     none (not a PEFT adapter folder)")
    else:
        lines += [f"adapters:     {adapter['type']} {adapter['role']}, task {adapter['task_type']}, r={adapter['r']}, "
                  f"lora_alpha={adapter['lora_alpha']}, {adapter['adapted_layers']} adapted layers",
                  f"  target modules: {adapter['target_modules']}; saved in full: {adapter['saved_modules'] or 'none'}",
                  f"  base model: {adapter['base_model_name_or_path']} (run `trlax info` on it for its architecture)"]
    ref = info.get("reference")
    if ref is not None:
        if "error" in ref:
            lines.append(f"reference:    create_reference_model needs a layer pattern: {ref['error']}")
        else:
            lines.append(f"reference:    layer pattern {ref['pattern']!r}, {ref['layers']} layers; "
                         f"num_shared_layers can be 0..{ref['layers'] - 1}")
            if "shared_names" in ref:
                lines.append(f"  num_shared_layers={ref['num_shared_layers']} shares {len(ref['shared_names'])} "
                             f"tensors, {ref['shared_params']:,} params ({ref['shared_of_total']:.0%} of the LM), "
                             "frozen in the policy:")
                lines += [f"    {name}" for name in ref["shared_names"]]
            else:
                lines.append("  (pass --num-shared-layers N to list the parameters it would share)")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------
def add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="what a checkpoint holds: architecture, sizes by dtype, value head, adapters, sharing",
        description="Describe a checkpoint (local folder or hub id) without loading its weights: architecture and "
                    "trlax support, parameter count and bytes per stored dtype, whether TRL's value head and PEFT "
                    "adapters are present, and which parameters create_reference_model(model, "
                    "num_shared_layers=N) shares with the policy.")
    parser.add_argument("source", metavar="PATH_OR_HUB_ID", help="checkpoint folder, PEFT adapter folder or hub id")
    parser.add_argument("--num-shared-layers", "-n", type=int, default=None, metavar="N",
                        help="list the parameter names the reference model would share for this N")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--local-files-only", action="store_true", help="never download; use the hub cache")
    parser.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder")
    parser.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    options = HubOptions(revision=args.revision, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    info = model_info(args.source, args.num_shared_layers, options)
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0
