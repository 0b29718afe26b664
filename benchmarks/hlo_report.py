"""Read a compiled XLA module's text: its computations, instructions, and what runs inside a while loop.

Used by `profile_decode.py` to name the ops an XLA profile reports (the profiler's events
carry HLO instruction names) and to find copies inside the decode loop. Pure text
parsing: no jax import.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+(?:, %[\w.\-]+)*)\}?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_KIND = re.compile(r"\bkind=(\w+)")
_FUSION_KIND = re.compile(r'"kind":"(\w+)"')


@dataclass
class Instruction:
    """One HLO instruction: name, opcode, output shape text and bytes, what it calls, its JAX source."""

    name: str
    opcode: str
    shape: str
    bytes: int
    computation: str
    calls: list[str]
    op_name: str
    kind: str  # fusion kind (kLoop, kInput, kOutput, kCustom: __ynn_fusion, ...) or ""
    root: str = ""  # the opcode of a fusion's root instruction
    body: str = ""  # a while loop's body computation


@dataclass
class Module:
    """A compiled module: computations -> instructions, the ENTRY name."""

    entry: str = ""
    computations: dict[str, list[Instruction]] = field(default_factory=dict)
    by_name: dict[str, Instruction] = field(default_factory=dict)

    def reachable(self, start: str) -> set[str]:
        """Computations `start` runs, itself included (through calls, bodies, conditions, ...)."""
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.computations:
                continue
            seen.add(name)
            for inst in self.computations[name]:
                todo.extend(inst.calls)
        return seen

    def scheduled(self, start: str) -> set[str]:
        """The computations of `reachable(start)` whose instructions run as their own ops: not the
        bodies of fusions or the reducers of reduces (what those contain is never materialised)."""
        inner = {c for insts in self.computations.values() for i in insts if i.opcode != "while"
                 and i.opcode not in ("call", "conditional") for c in i.calls}
        return self.reachable(start) - inner

    def whiles(self, computation: str) -> list[Instruction]:
        return [i for i in self.computations.get(computation, []) if i.opcode == "while"]


def shape_bytes(shape: str) -> int:
    """Bytes of every array in a shape text (a tuple counts all its elements)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        total += _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def parse(text: str) -> Module:
    """Parse `compiled.as_text()` (an HloModule after optimisation)."""
    module = Module()
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            module.computations[current] = []
            if header.group(1):
                module.entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        _, name, shape, opcode, rest = m.groups()
        calls: list[str] = []
        for group in _CALLED.findall(rest):
            calls.extend(c.strip().lstrip("%") for c in group.split(","))
        op_name = _OP_NAME.search(rest)
        kind = _KIND.search(rest)
        fusion_kind = _FUSION_KIND.search(rest)
        kind_text = kind.group(1) if kind else ""
        if fusion_kind:
            kind_text = f"{kind_text}:{fusion_kind.group(1).strip('_')}"
        inst = Instruction(name, opcode, shape.split("{")[0] if "(" not in shape else shape, shape_bytes(shape),
                           current, calls, op_name.group(1) if op_name else "", kind_text)
        body = _BODY.search(rest)
        inst.body = body.group(1) if body else ""
        module.computations[current].append(inst)
        module.by_name[name] = inst
    for inst in module.by_name.values():  # a fusion's root opcode says what it does (copy, dot, reduce, ...)
        if inst.opcode == "fusion" and inst.calls:
            body = module.computations.get(inst.calls[0], [])
            if body:
                inst.root = body[-1].opcode
    return module


def fused_ops(module: Module, inst: Instruction) -> list[str]:
    """The distinct non-trivial opcodes inside a fusion (what it computes), in order."""
    if inst.opcode != "fusion":
        return [inst.opcode]
    skip = {"parameter", "bitcast", "constant", "broadcast", "reshape", "get-tuple-element", "tuple"}
    out: list[str] = []
    for name in module.reachable(inst.calls[0]):
        for i in module.computations[name]:
            if i.opcode not in skip and i.opcode not in out:
                out.append(i.opcode)
    return out


def is_copy(module: Module, inst: Instruction) -> bool:
    """A materialised copy, transpose or dtype cast: such an op, or a fusion that only moves data."""
    if inst.opcode in ("copy", "transpose", "convert"):
        return True
    if inst.opcode != "fusion":
        return False
    moves = {"copy", "transpose", "bitcast", "parameter", "reshape", "broadcast", "slice", "concatenate",
             "convert"}
    return set(fused_ops(module, inst)) <= moves and inst.root in ("copy", "transpose", "convert")


def decode_loop(module: Module) -> Instruction:
    """The ENTRY computation's while loop (generate has exactly one: the decode loop)."""
    loops = module.whiles(module.entry)
    if len(loops) != 1:
        raise ValueError(f"expected one while loop in ENTRY, found {len(loops)}")
    return loops[0]


def large_moves(module: Module, computations: set[str], min_bytes: int) -> list[Instruction]:
    """Copies, transposes and converts of >= min_bytes in the given computations (not inside fusions
    that compute something else: those read their inputs where they lie)."""
    return [inst for name in sorted(computations) for inst in module.computations[name]
            if inst.bytes >= min_bytes and is_copy(module, inst)]
