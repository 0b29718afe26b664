"""In-memory conversion between trlax and PyTorch models: transformers, TRL value-head, PEFT LoRA.

From PyTorch, a model's `state_dict()` tensors are read as numpy views (no copy for
float32, no file), then go through the same strict name and shape checks as a checkpoint
on disk (`StateDictReader` has the checkpoint reader's interface). To PyTorch, trlax's
state dict (transformers key names) is loaded into a fresh transformers model, wrapped in
PEFT / TRL when the trlax model has an adapter / a value head.

torch, peft and trl are optional dependencies: they are imported inside the functions
that need them (`require`), and a missing one is a TrlaxError naming it.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np

from trlax.errors import TrlaxError, UnsupportedModelError

PYTORCH_PACKAGES = ("transformers", "trl", "peft")
TRL_PPO_MODULE = "trl.experimental.ppo"


class MissingDependencyError(TrlaxError):
    """An optional dependency (torch, peft, trl) a conversion needs is not installed."""


def require(package: str, what: str) -> ModuleType:
    """Import an optional dependency, or raise MissingDependencyError naming it and what needs it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRL's experimental modules warn on import
            return importlib.import_module(package)
    except ImportError:
        extra = {"torch": "torch", "peft": "peft", TRL_PPO_MODULE: "trl"}.get(package, package)
        raise MissingDependencyError(f"{what} needs {extra}, which is not installed: pip install {extra}") from None


def is_torch_model(obj: Any) -> bool:
    """Whether `obj` is a PyTorch model from transformers, TRL or PEFT (checked without importing torch)."""
    module = type(obj).__module__.split(".")[0]
    return module in PYTORCH_PACKAGES and callable(getattr(obj, "state_dict", None))


def is_torch_tensor(obj: Any) -> bool:
    """Whether `obj` is a torch tensor (checked without importing torch)."""
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU numpy view of a torch tensor (bfloat16 through ml_dtypes); no copy when already on CPU."""
    torch = require("torch", "converting a PyTorch model")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def numpy_to_tensor(array: np.ndarray) -> Any:
    """A torch tensor with the values and dtype of a numpy array (bfloat16 included)."""
    torch = require("torch", "converting to a PyTorch model")
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


class StateDictReader:
    """A state dict of numpy arrays behind the CheckpointReader interface `load_params` reads."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self._state = state

    def __enter__(self) -> StateDictReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._state = {}

    def keys(self) -> list[str]:
        return list(self._state)

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._state[key].dtype)

    def nbytes(self, key: str) -> int:
        return int(self._state[key].nbytes)

    def file_of(self, key: str) -> str:
        """Where `key` comes from, for error messages."""
        return "the in-memory state dict"

    def get(self, key: str) -> np.ndarray:
        return self._state[key]

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's leading axis (a view)."""
        return self._state[key][start:stop]

    def opened_file(self, key: str) -> None:
        """No file: slice reads fall back to whole tensors (see `trlax.checkpoint.slices.tensor_slices`)."""
        return None


@dataclass(frozen=True)
class TorchParts:
    """A PyTorch model taken apart: what trlax builds its model, value head and adapter from.

    config: the transformers config; lm_state: the LM's state dict (transformers keys,
    numpy); v_head: TRL's {"summary": {"kernel": [H, 1], "bias": [1]}} or None, and
    v_head_dropout its dropout probability (0.0 for TRL's Identity; None without a head), and
    adapter_config / adapter_state: the PEFT LoraConfig and PEFT-keyed adapter tensors
    (`base_model.model.<path>.lora_A.weight`), or None; adapter_trainable: not in
    PEFT's inference mode; name: the model's `name_or_path`; reward_adapter_name: TRL's `rm_adapter_name`
    when the model has a reward adapter, whose PEFT LoraConfig and tensors are reward_adapter_config and
    reward_adapter_state (PEFT's keys, as adapter_state), and its `score` head's reward_score
    (`weight` [num_labels, H], `bias`).
    """

    config: Any
    lm_state: dict[str, np.ndarray]
    v_head: dict[str, Any] | None
    adapter_config: Any
    adapter_state: dict[str, np.ndarray] | None
    adapter_trainable: bool
    name: str | None
    generation_config: Any = None
    v_head_dropout: float | None = None
    reward_adapter_name: str | None = None
    reward_adapter_config: Any = None
    reward_adapter_state: dict[str, np.ndarray] | None = None
    reward_score: dict[str, np.ndarray] | None = None


def checkpoint_state(model: Any, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """A transformers model's state dict (torch tensors) under its checkpoint names, as numpy.

    transformers v5 renames some weights in memory (GPT-NeoX's `embed_out` is `lm_head`; MoE
    experts are fused into one tensor per layer) and converts them back when it saves; this is
    the same reversal (`revert_weight_conversion`, what `save_pretrained` calls).
    """
    loading = require("transformers.core_model_loading", "converting a transformers model")
    reverted = loading.revert_weight_conversion(model, untied(state))
    return {key: tensor_to_numpy(value) for key, value in reverted.items()}


def untied(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict without its tied copies: a tensor listed under a second name (`lm_head.weight` of a tied
    head) is dropped, as `save_pretrained` drops it. transformers renames some of them in memory and reverts
    only what loading converted (a tied GPT-NeoX loaded from disk keeps `lm_head`, no `embed_out`)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    kept = {}
    for key, value in state.items():
        identity = (value.data_ptr(), tuple(value.shape))
        if value.numel() and identity in seen:
            continue
        seen.add(identity)
        kept[key] = value
    return kept


def _peft_base_state(peft_model: Any) -> dict[str, np.ndarray]:
    """The base weights under a PeftModel's injected LoRA layers, under the base's checkpoint names.

    A merged adapter is refused: its base layers hold base + LoRA, and the adapter would apply twice.
    """
    if any(getattr(layer, "merged", False) for layer in peft_model.modules()):  # PEFT's tuner layers
        raise TrlaxError("this PEFT model's LoRA adapter is merged into its base weights (merge_adapter()), so "
                         "its base cannot be read apart from the adapter; call unmerge_adapter() first, or "
                         "merge_and_unload() to convert the merged model as a plain transformers model")
    if any(getattr(layer, "disable_adapters", False) for layer in peft_model.modules() if hasattr(layer, "lora_A")):
        raise TrlaxError("this PEFT model's adapter layers are disabled (disable_adapter_layers()), so it computes "
                         "as its base alone, while trlax would apply the adapter; call enable_adapter_layers() "
                         "first, or convert peft_model.get_base_model() to leave the adapter out")
    base = peft_model.get_base_model()
    # The adapter's own tensors (LoRA weights, a modules_to_save copy) are left out; a module saved in full
    # keeps the base's weights as `original_module`.
    state = {key.replace(".base_layer.", ".").replace(".original_module.", "."): value
             for key, value in base.state_dict().items() if ".lora_" not in key and ".modules_to_save." not in key}
    return checkpoint_state(base, state)


def torch_parts(obj: Any) -> TorchParts:
    """Take a transformers PreTrainedModel, a TRL value-head model, or a PEFT PeftModel (or TRL over PEFT) apart."""
    v_head = dropout = None
    lm = obj
    reward_adapter = getattr(obj, "rm_adapter_name", None) if getattr(obj, "supports_rm_adapter", False) else None
    if hasattr(obj, "v_head") and hasattr(obj, "pretrained_model"):  # TRL's PreTrainedModelWrapper
        summary = obj.v_head.summary
        v_head = {"summary": {"kernel": tensor_to_numpy(summary.weight).T.astype(np.float32),
                              "bias": tensor_to_numpy(summary.bias).astype(np.float32)}}
        dropout = float(getattr(obj.v_head.dropout, "p", 0.0))  # nn.Dropout, or nn.Identity for none
        lm = obj.pretrained_model
    if type(lm).__module__.split(".")[0] == "peft":
        active = list(getattr(lm, "active_adapters", None) or [lm.active_adapter])
        if len(active) > 1:
            raise TrlaxError(f"this PEFT model has {len(active)} active adapters {active}; a trlax policy applies "
                             "one: pick it with set_adapter(name), or combine them first (add_weighted_adapter)")
        base = lm.get_base_model()
        reward = {}
        if reward_adapter is not None:  # TRL's reward adapter: its LoRA weights in the PeftModel, its head beside
            reward = {"reward_adapter_name": reward_adapter, "reward_adapter_config": lm.peft_config[reward_adapter],
                      "reward_adapter_state": adapter_tensors(lm, reward_adapter),
                      "reward_score": {k: tensor_to_numpy(v) for k, v in obj.score.state_dict().items()}}
        adapter_config = lm.peft_config[active[0]]
        return TorchParts(base.config, _peft_base_state(lm), v_head, adapter_config, adapter_tensors(lm, active[0]),
                          not getattr(adapter_config, "inference_mode", False), base.config.name_or_path or None,
                          getattr(base, "generation_config", None), dropout, **reward)
    return TorchParts(lm.config, checkpoint_state(lm, lm.state_dict()), v_head, None, None, False,
                      lm.config.name_or_path or None, getattr(lm, "generation_config", None), dropout)


def adapter_tensors(peft_model: Any, name: str) -> dict[str, np.ndarray]:
    """A PeftModel's adapter `name` under PEFT's saved keys (`base_model.model.<path>.lora_A.weight`), as numpy."""
    peft = require("peft", "converting a PEFT model")
    return {k: tensor_to_numpy(v) for k, v in peft.get_peft_model_state_dict(peft_model, adapter_name=name).items()}


def torch_model(config: Any, state: dict[str, np.ndarray], tied_keys: set[str], generation_config: Any = None) -> Any:
    """The transformers (PyTorch) model `config.architectures[0]` names (an LM, a sequence classifier, ...)
    holding `state` (checkpoint keys; tied copies may be absent), with `generation_config` (a transformers
    GenerationConfig) when given.

    The state goes through transformers' own loading (`from_pretrained(None, state_dict=...)`), so the
    families whose weights transformers renames or fuses in memory (GPT-NeoX, the MoE families) load too.
    """
    require("torch", "to_torch()")
    name = config.architectures[0]
    model_class = getattr(require("transformers", "to_torch()"), name, None)
    if model_class is None:
        raise UnsupportedModelError(f"transformers {version('transformers')} has no {name}, so to_torch() cannot "
                                    "build this model in PyTorch; save_pretrained writes its checkpoint")
    model, info = model_class.from_pretrained(
        None, config=config, state_dict={k: numpy_to_tensor(v) for k, v in state.items()}, dtype="auto",
        output_loading_info=True)
    missing = set(info["missing_keys"]) - tied_keys
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise TrlaxError(f"the transformers {type(model).__name__} does not match trlax's state dict: missing "
                         f"{sorted(missing)[:4]}, unexpected {sorted(info['unexpected_keys'])[:4]}, mismatched "
                         f"{sorted(info['mismatched_keys'])[:4]}")
    if generation_config is not None:
        model.generation_config = copy.deepcopy(generation_config)
    return model.eval()


def peft_lm(model: Any, adapter_config: dict[str, Any], adapter_state: dict[str, np.ndarray]) -> Any:
    """A PEFT PeftModel over `model` with one LoRA adapter ("default") holding `adapter_state` (PEFT keys)."""
    peft = require("peft", "to_torch() of a LoRA policy")
    wrapped = peft.get_peft_model(model, peft_lora_config(adapter_config))
    load_adapter_state(wrapped, adapter_state, "default")
    return wrapped


def peft_lora_config(adapter_config: dict[str, Any]) -> Any:
    """A peft.LoraConfig of adapter_config.json's fields (its bookkeeping `peft_type` / `auto_mapping` left out)."""
    peft = require("peft", "to_torch() of a LoRA adapter")
    return peft.LoraConfig(**{k: v for k, v in adapter_config.items() if k not in ("peft_type", "auto_mapping")})


def load_adapter_state(peft_model: Any, adapter_state: dict[str, np.ndarray], name: str) -> None:
    """PEFT-keyed adapter tensors into a PeftModel's adapter `name`; TrlaxError for tensors PEFT did not take."""
    peft = require("peft", "to_torch() of a LoRA adapter")
    result = peft.set_peft_model_state_dict(peft_model, {k: numpy_to_tensor(v) for k, v in adapter_state.items()},
                                            adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise TrlaxError(f"PEFT did not take the adapter tensors {sorted(unexpected)[:4]}")


def add_reward_adapter(trl_model: Any, name: str, adapter_config: dict[str, Any],
                       adapter_state: dict[str, np.ndarray], score: dict[str, np.ndarray]) -> None:
    """TRL's reward adapter on a TRL value-head model over a PeftModel, as TRL's `from_pretrained(reward_adapter=...)`
    sets one up: the frozen LoRA adapter `name` (PEFT keys) beside the active policy adapter, and the frozen
    `score` head (`weight` [num_labels, H], optional `bias`) as an nn.Linear in the LM's dtype."""
    torch = require("torch", "to_torch() of a reward adapter")
    lm = trl_model.pretrained_model
    lm.add_adapter(name, peft_lora_config(adapter_config))
    load_adapter_state(lm, adapter_state, name)
    for key, param in lm.named_parameters():
        if f".{name}." in key:
            param.requires_grad = False
    num_labels, hidden = score["weight"].shape
    head = torch.nn.Linear(hidden, num_labels, bias="bias" in score, dtype=lm.dtype)
    head.load_state_dict({k: numpy_to_tensor(v).to(lm.dtype) for k, v in score.items()})
    head.requires_grad_(False)
    trl_model.score, trl_model.supports_rm_adapter, trl_model.rm_adapter_name = head, True, name


def trl_value_head_model(lm: Any, v_head: dict[str, np.ndarray], encoder_decoder: bool,
                         head_options: dict[str, Any]) -> Any:
    """TRL's AutoModelFor{CausalLM,Seq2SeqLM}WithValueHead over `lm`, with `v_head` (TRL's keys
    `summary.weight` [1, H], `summary.bias` [1]) loaded; needs trl."""
    trl_ppo = require(TRL_PPO_MODULE, "to_torch() of a value-head model (TRL's classes)")
    cls = trl_ppo.AutoModelForSeq2SeqLMWithValueHead if encoder_decoder else trl_ppo.AutoModelForCausalLMWithValueHead
    model = cls(lm, **head_options)
    model.v_head.load_state_dict({k: numpy_to_tensor(np.asarray(v, np.float32)) for k, v in v_head.items()})
    model.is_peft_model = type(lm).__module__.split(".")[0] == "peft"
    return model.eval()
