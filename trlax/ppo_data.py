"""Prompts and tokenizers for `trlax ppo`: a prompt file or dataset, batches of left-padded ids, a stateless order.

Prompts come from a text file (one per line), a JSONL file (a "prompt" field per line) or a
local `datasets` folder (`datasets.load_from_disk`, a "prompt" column). They are tokenized once,
left-padded to one width (so every step has the same shapes and compiles once), and visited
in a shuffled order that depends only on (seed, step): the data position of a run is its
step, so a resumed run sees exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trlax.errors import TrlaxError


class PromptError(TrlaxError):
    """A prompt source that cannot be read or holds no usable prompt."""


class TextCodec(Protocol):
    """What the trainer needs from a tokenizer: text -> ids and ids -> text."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class HFCodec:
    """A transformers tokenizer (special tokens added as the tokenizer does)."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _prompt_field(record: Any, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise PromptError(f"{where} has no string 'prompt' field")
    return record["prompt"]


def read_prompts(source: str | Path) -> list[str]:
    """Prompt texts from a .txt file (one per non-empty line), a .jsonl file or a .json file (JSON lines or
    an array of objects; a "prompt" field each) or a `datasets` folder saved with `save_to_disk` (a "prompt"
    column; needs `datasets`)."""
    path = Path(source)
    if path.is_dir():
        try:
            import datasets  # optional: only for dataset folders
        except ImportError:
            raise PromptError(f"{path} is a folder: reading a datasets folder needs `pip install datasets`") from None
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        if "prompt" not in data.column_names:
            raise PromptError(f"dataset {path} has no 'prompt' column (columns: {data.column_names})")
        prompts = [str(p) for p in data["prompt"]]
    elif not path.is_file():
        raise PromptError(f"--prompts {path} does not exist: pass a .txt file, a .jsonl file or a datasets folder")
    elif path.suffix in (".jsonl", ".json"):
        text = _read_text(path)
        if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path} is not valid JSON ({e})") from None
            prompts = [_prompt_field(record, f"{path}[{n}]") for n, record in enumerate(records)]
        else:  # JSON lines (what datasets' to_json writes, as .json too)
            prompts = []
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}:{n} is not valid JSON ({e})") from None
                prompts.append(_prompt_field(record, f"{path}:{n}"))
    else:
        prompts = [line for line in _read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return prompts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None


@dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts: ids and mask [N, P] int32, left-padded with `pad_id`; `texts` what the policy reads
    (the original text, or for a prompt cut to its last `max_length` tokens the text those tokens decode to)."""

    texts: list[str]
    ids: np.ndarray
    mask: np.ndarray

    @classmethod
    def build(cls, texts: Sequence[str], codec: TextCodec, pad_id: int, max_length: int) -> PromptSet:
        """Tokenize every prompt, keep its last `max_length` tokens, left-pad to the longest."""
        full = [codec.encode(t) for t in texts]
        encoded = [tokens[-max_length:] for tokens in full]
        empty = [t for t, e in zip(texts, encoded, strict=True) if not e]
        if empty:
            raise PromptError(f"{len(empty)} prompt(s) tokenize to nothing, e.g. {empty[0]!r}")
        width = max(len(e) for e in encoded)
        ids = np.full((len(encoded), width), pad_id, np.int32)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens):] = tokens
            mask[row, width - len(tokens):] = 1
        # A reward source reads the prompt the policy saw (as TRL's classic examples decode the truncated query).
        seen = [t if len(f) == len(e) else codec.decode(e) for t, f, e in zip(texts, full, encoded, strict=True)]
        return cls(seen, ids, mask)

    def rows(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """The [batch_size] prompt rows of `step`: row k of the stream is perm_e[k mod N], with a fresh
        permutation perm_e of the N prompts per pass e (a function of seed and e alone)."""
        n = len(self.texts)
        stream = np.arange(step * batch_size, (step + 1) * batch_size)
        passes = stream // n
        out = np.empty(batch_size, np.int64)
        for e in np.unique(passes):
            perm = np.random.default_rng([seed, int(e)]).permutation(n)
            out[passes == e] = perm[stream[passes == e] % n]
        return out
