"""Measurement helpers shared by every benchmark process: timing, noise, memory, stats, output.

Imports nothing heavy (no jax, no torch), so the orchestrator stays light and each case
process pays only for the framework it benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RESULT_PREFIX = "BENCH_JSON "  # the one stdout line a case process reports with


# --- statistics ------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    """{"median", "min", "max", "n"} of the values, or None when there are none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --- noise: CPU used by other processes -------------------------------------------------------


def _proc_stat_busy() -> tuple[float, int] | None:
    """(busy CPU seconds of the whole machine since boot, number of CPUs) from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already counted in user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), ncpu


class NoiseMeter:
    """Fraction of all CPUs used by OTHER processes between start() and stop().

    Machine-wide busy time (/proc/stat) minus this process's own CPU time (os.times, all
    threads), over ncpu x wall time. 0.0 = the machine was ours alone; None off Linux.
    """

    def start(self) -> None:
        self._stat = _proc_stat_busy()
        own = os.times()
        self._own = own.user + own.system
        self._wall = time.perf_counter()

    def stop(self) -> float | None:
        stat = _proc_stat_busy()
        if stat is None or self._stat is None:
            return None
        own = os.times()
        wall = time.perf_counter() - self._wall
        other = (stat[0] - self._stat[0]) - (own.user + own.system - self._own)
        # /proc/stat counts in clock ticks (10 ms): over a short section the share is coarse.
        return round(min(1.0, max(0.0, other / (stat[1] * wall))), 4) if wall > 0 else None


# --- memory -----------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Current resident set size of this process, MB (VmRSS; the peak where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


# --- one case's measurement -------------------------------------------------------------------


@dataclass
class Bench:
    """What a case function hands back: a callable to time, or static measurements.

    call(): one iteration, returning what `sync` must wait for (device work is async).
    work: units of work per call (tokens, new tokens, steps) for throughput metrics.
    extra: facts about the setup (shapes, versions, checks) copied into the result.
    static: for cases that measure no time (memory), the values to report instead.
    check(out): run on the last call's output after timing; raises if the work was not
    what the case claims (e.g. fewer tokens generated), returns facts for `extra`.
    """

    call: Callable[[], Any] | None = None
    sync: Callable[[Any], Any] = lambda out: out
    work: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    static: dict[str, Any] | None = None
    check: Callable[[Any], dict[str, Any]] | None = None


class CompileCounter:
    """Counts compilations (and their seconds) while active; a no-op for frameworks without one.

    The trlax side installs a jax.monitoring listener; `snapshot()` returns the running
    totals so a caller can difference them around a section.
    """

    def __init__(self) -> None:
        self.compiles = 0
        self.traces = 0
        self.compile_s = 0.0
        self.trace_s = 0.0

    def snapshot(self) -> tuple[int, int, float, float]:
        return self.compiles, self.traces, self.compile_s, self.trace_s


def _timed(bench: Bench, outputs: list[Any]) -> float:
    start = time.perf_counter()
    out = bench.call()
    bench.sync(out)
    seconds = time.perf_counter() - start
    if bench.check is not None:  # keep only the last output, and only when it will be checked
        outputs[:] = [out]
    return seconds


def measure(bench: Bench, warmup: int, repeats: int, counter: CompileCounter) -> dict[str, Any]:
    """First call (compile), warm-up calls and timed repeats of `bench.call`, all synced.

    Returns first_call_s, warmup_s, times_s, noise (other processes' CPU share during the
    timed repeats; noise_first: during the first call), and the compile/trace counts and
    seconds of the first call and of everything after it (after_first: should be 0 when
    shapes do not change).
    """
    outputs: list[Any] = []
    before = counter.snapshot()
    meter = NoiseMeter()
    meter.start()
    first = _timed(bench, outputs)
    noise_first = meter.stop()
    after_first = counter.snapshot()
    warm = [_timed(bench, outputs) for _ in range(warmup)]
    meter.start()
    times = [_timed(bench, outputs) for _ in range(repeats)]
    noise = meter.stop()
    end = counter.snapshot()
    if bench.check is not None:
        bench.extra.update(bench.check(outputs[0]))
    outputs.clear()
    return {
        "first_call_s": first,
        "warmup_s": warm,
        "times_s": times,
        "noise": noise if repeats else None,
        "noise_first": noise_first,
        "compiles_first": after_first[0] - before[0],
        "traces_first": after_first[1] - before[1],
        "compile_s_first": round(after_first[2] - before[2] + after_first[3] - before[3], 4),
        "compiles_after_first": end[0] - after_first[0],
        "traces_after_first": end[1] - after_first[1],
    }


def emit(result: dict[str, Any]) -> None:
    """Print the case's result as the one JSON line the orchestrator parses."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def parse_result(stdout: str) -> dict[str, Any] | None:
    """The last result line of a case process's stdout, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


# --- inputs shared by both stacks ---------------------------------------------------------------


def tokens_digest(new_tokens: Any) -> str:
    """A fingerprint of generated tokens [B, N] (any int array): equal digests, equal tokens. The report
    compares the two sides' greedy float32 generations with it, so a broken fast path cannot look fast."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(np.asarray(new_tokens, np.int64)).tobytes()).hexdigest()[:16]


def output_sample(logits: Any, values: Any) -> list[float]:
    """A few outputs of a forward pass to compare across stacks: the last position's first 8 logits of each
    row, then each row's last value (logits [B, T, V], values [B, T], any float array -> 9 * B floats).
    The report gives the largest difference between the two sides' samples of a float32 case."""
    import numpy as np

    logits, values = np.asarray(logits, np.float32), np.asarray(values, np.float32)
    return np.concatenate([logits[:, -1, :8].ravel(), values[:, -1]]).tolist()


def token_ids(vocab_size: int, batch: int, seq: int, seed: int = 0) -> Any:
    """Random token ids [batch, seq] int32 (numpy), the same in both stacks for the same seed.

    Id 0 .. vocab-2: the last id (GPT-2's eos/pad) never occurs, so nothing depends on eos handling.
    """
    import numpy as np

    return np.random.RandomState(seed).randint(0, vocab_size - 1, (batch, seq)).astype(np.int32)


def ppo_inputs(vocab_size: int, batch: int, seq: int) -> dict[str, Any]:
    """A PPO minibatch's raw inputs (numpy): ids [B, T], mask [B, T] (all ones), response_mask
    [B, T] (the second half of each row is the response), scores [B] float32."""
    import numpy as np

    ids = token_ids(vocab_size, batch, seq)
    response = np.zeros_like(ids)
    response[:, seq // 2:] = 1
    scores = np.random.RandomState(1).normal(size=(batch,)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "response_mask": response, "scores": scores}


@dataclass
class Context:
    """What a case function gets: the case, its checkpoint and config, shapes, device, and the
    process's RSS right after the imports (the baseline memory figures are measured above)."""

    case: Any  # cases.Case
    model_dir: str
    cfg: dict[str, Any]
    shapes: Any  # cases.Shapes
    device: str
    rss_baseline_mb: float
