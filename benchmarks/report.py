"""Turn case results + hardware probes into table rows, target checks and one markdown report.

Metric of each case (cases.Case.metric), from the timed repeats of its process:
- throughput: work per call / seconds per call (min time gives the max throughput);
- ms_per_step: seconds per call x 1000 / decode steps per call;
- seconds: the timed call itself (load: one call per process, pooled over processes);
- mb: the static value the case reports (param bytes held).
ratio = trlax median / torch median of that metric: a speedup for throughputs, a
fraction (< 1 is better) for ms, s and MB. "% of limit" = the median as a fraction of
the machine limit (roofline.py) with the jitted `jnp.dot` peak of the case's dtype and
the best measured read bandwidth.
"""

from __future__ import annotations

from typing import Any

from cases import BY_NAME, Case
from common import summarize
from roofline import decode_bounds, fraction_of_limit


def metric_stats(case: Case, result: dict[str, Any] | None) -> dict[str, float] | None:
    """{"median", "min", "max", "n"} of the case's metric from one result, or None (missing / error)."""
    if not result or result.get("error"):
        return None
    if case.metric == "mb":
        return summarize([result["static"]["value"]])
    times = result.get("times_s") or []
    if not times:
        return None
    if case.metric == "throughput":
        work = result["work_per_call"]
        return summarize([work / t for t in times])
    if case.metric == "ms_per_step":
        steps = result["extra"]["steps_per_call"]
        return summarize([t * 1000 / steps for t in times])
    return summarize(times)


def limits(hardware: dict[str, Any]) -> dict[str, float | None]:
    """Matmul peaks (FLOP/s, jitted jnp.dot) per dtype and the best measured read bandwidth (bytes/s)."""
    jax_probes = (hardware.get("jax") or {}).get("probes") or {}

    def median(probes: dict[str, Any], name: str) -> float | None:
        probe = probes.get(name)
        return probe["median"] if probe else None

    peak32, peak16 = median(jax_probes, "matmul_f32"), median(jax_probes, "matmul_bf16")
    reads = [median((hardware.get(impl) or {}).get("probes") or {}, "read") for impl in ("jax", "torch")]
    reads = [r for r in reads if r]
    return {"float32": peak32 * 1e9 if peak32 else None, "bfloat16": peak16 * 1e9 if peak16 else None,
            "read_bytes_per_s": max(reads) * 1e9 if reads else None}


def build_rows(results: dict[str, dict[str, Any]], hardware: dict[str, Any], meta: dict[str, Any]) -> list[dict]:
    """One row per case: both sides' metric stats, ratio, fraction of limit, compile and memory facts.

    results: {case name: {"trlax": result, "torch": result}}.
    """
    lim = limits(hardware)
    rows = []
    for name, sides in results.items():
        case = BY_NAME[name]
        cfg, shapes = meta["models"][case.model], meta["shapes"]
        row: dict[str, Any] = {"case": name, "group": case.group, "unit": case.unit,
                               "higher_is_better": case.higher_is_better, "description": case.description}
        for impl in ("trlax", "torch"):
            res = sides.get(impl)
            stats = metric_stats(case, res)
            row[impl] = stats
            row[f"{impl}_error"] = (res or {}).get("error", "not run" if res is None else None)
            throughput = stats["median"] if stats and case.metric == "throughput" else None
            row[f"{impl}_fraction"] = fraction_of_limit(case.kind, cfg, shapes, throughput, lim[case.dtype],
                                                        lim["read_bytes_per_s"], case.weight_bytes)
            for key in ("first_call_s", "compile_s_first", "compiles_after_first", "peak_rss_mb",
                        "peak_rss_above_import_mb", "device_peak_mb", "noise", "import_s", "attempts"):
                row[f"{impl}_{key}"] = (res or {}).get(key)
            row[f"{impl}_extra"] = (res or {}).get("extra", {})
            times = summarize((res or {}).get("times_s") or [])
            row[f"{impl}_call_s"] = times["median"] if times else None
        if case.kind == "generate" and not case.sample and case.dtype == "float32" and not case.rollout_dtype:
            digests = [row[f"{impl}_extra"].get("new_tokens_digest") for impl in ("trlax", "torch")]
            row["same_tokens"] = digests[0] == digests[1] if all(digests) else None  # greedy float32: one answer
        if case.dtype == "float32":
            row["output_diff"] = _largest_difference(row["trlax_extra"], row["torch_extra"])
        both = row["trlax"] and row["torch"] and row["torch"]["median"]
        row["ratio"] = row["trlax"]["median"] / row["torch"]["median"] if both else None
        if case.kind == "generate" and lim[case.dtype] and lim["read_bytes_per_s"]:
            row["decode_bounds"] = decode_bounds(cfg, shapes.batch, shapes.prompt, shapes.new_tokens,
                                                 lim[case.dtype], lim["read_bytes_per_s"], case.weight_bytes)
        rows.append(row)
    return rows


# Forward logits/values and PPO losses of the two sides agree to the project's float32 parity tolerance.
OUTPUT_TOLERANCE = 1e-4


def _largest_difference(trlax_extra: dict[str, Any], torch_extra: dict[str, Any]) -> float | None:
    """The largest absolute difference between the two sides' checked outputs (a forward's output sample or
    the last PPO step's loss); None when a side did not report them."""
    for key in ("output_sample", "last_step_loss"):
        ours, theirs = trlax_extra.get(key), torch_extra.get(key)
        if ours is not None and theirs is not None:
            pairs = zip(ours, theirs, strict=True) if isinstance(ours, list) else [(ours, theirs)]
            return max(abs(a - b) for a, b in pairs)
    return None


# --- targets (issue 9, point 3) -----------------------------------------------------------------


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["case"] == name), None)


def _compile_s(row: dict) -> float | None:
    """The first call's extra time over a steady call: what compiling cost the user."""
    first, steady = row.get("trlax_first_call_s"), row.get("trlax_call_s")
    return first - steady if first is not None and steady is not None else None


def _bound(row: dict) -> str:
    frac = row.get("trlax_fraction")
    if frac is None:
        return ""
    if "decode_bounds" in row:
        b = row["decode_bounds"]
        return (f"{frac:.0%} of the decode roofline ({b['roofline_tok_s']:.0f} tok/s: bandwidth "
                f"{b['bandwidth_tok_s']:.0f}, compute {b['compute_tok_s']:.0f})")
    return f"{frac:.0%} of the jnp.dot matmul peak"


def check_targets(rows: list[dict], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: measured value, pass/miss, relative margin, and what bounds it."""
    out: list[dict[str, Any]] = []

    def add(target: str, measured: float | None, goal: float, at_least: bool, row: dict | None,
            fmt: str = "{:.2f}") -> None:
        if measured is None:
            out.append({"target": target, "measured": None, "ok": None, "margin": None, "bound": "not measured"})
            return
        ok = measured >= goal if at_least else measured <= goal
        out.append({"target": target, "measured": fmt.format(measured), "ok": ok,
                    "margin": (measured - goal) / goal, "bound": _bound(row) if row else ""})

    def ratio(name: str) -> tuple[float | None, dict | None]:
        row = _row(rows, name)
        return (row["ratio"] if row else None), row

    r, row = ratio("forward")
    add("forward >= 1.3x torch", r, 1.3, True, row, "{:.2f}x")
    if row:
        add("forward >= 90% of the matmul peak", row["trlax_fraction"], 0.9, True, row, "{:.0%}")
    for name in ("generate_greedy", "generate_sample"):
        r, row = ratio(name)
        add(f"{name} >= 3x torch", r, 3.0, True, row, "{:.2f}x")
    for name in ("tiny_generate_greedy", "tiny_generate_sample"):
        row = _row(rows, name)
        add(f"{name}: <= 0.2 ms per decode step", row["trlax"]["median"] if row and row["trlax"] else None,
            0.2, False, row, "{:.3f} ms")
    r, row = ratio("train_step")
    add("train step >= 1.2x torch", r, 1.2, True, row, "{:.2f}x")
    if row and row["trlax_peak_rss_mb"] and row["torch_peak_rss_mb"]:
        add("train step peak RSS <= torch's (ratio)", row["trlax_peak_rss_mb"] / row["torch_peak_rss_mb"], 1.0,
            False, None, "{:.2f}x")
    row = _row(rows, "load")
    if row:
        add("load <= 1 s", row["trlax"]["median"] if row["trlax"] else None, 1.0, False, None, "{:.2f} s")
        ckpt_mb = meta["checkpoint_bytes"]["small"] / 2**20
        above = row.get("trlax_peak_rss_above_import_mb")
        add("load peak RSS above import <= 1.3x checkpoint", above / ckpt_mb if above else None, 1.3, False, None,
            "{:.2f}x")
    for name, goal in (("forward", 3.0), ("generate_greedy", 8.0), ("generate_sample", 8.0), ("train_step", 15.0)):
        row = _row(rows, name)
        add(f"{name} first-call compile <= {goal:.0f} s", _compile_s(row) if row and row["trlax"] else None, goal,
            False, None, "{:.2f} s")
    recompiles = [r["case"] for r in rows if r.get("trlax_compiles_after_first")]
    measured = [r for r in rows if r.get("trlax_compiles_after_first") is not None]
    out.append({"target": "no recompilation between calls of the same shapes", "ok": not recompiles if measured
                else None, "measured": f"{len(recompiles)} of {len(measured)} cases recompiled"
                + (f" ({', '.join(recompiles)})" if recompiles else ""), "margin": None, "bound": ""})
    return out


# --- markdown -----------------------------------------------------------------------------------


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _stats(stats: dict | None, error: str | None) -> str:
    if stats is None:
        return "error" if error and error != "not run" else "–"
    if stats["n"] == 1:
        return _num(stats["median"])
    return f"{_num(stats['median'])} ({_num(stats['min'])}–{_num(stats['max'])})"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _pair(a: Any, b: Any) -> str:
    return f"{_num(a)} / {_num(b)}"


def markdown(rows: list[dict], targets: list[dict], hardware: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = []
    if meta.get("quick"):
        lines += ["**QUICK MODE**: every case ran on a 2 x 64 stand-in model with tiny shapes; the numbers only show "
                  "that the harness works. Run without --quick for measurements.", ""]
    s = meta["shapes"]
    lines += [f"Machine: {meta['machine']}. Device: {meta['device']}. Date: {meta['date']}.",
              f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; "
              f"trlax commit {meta.get('git_commit') or 'unknown'}.",
              f"Shapes: forward/train b{s.batch} x s{s.seq}; generate b{s.batch}, {s.prompt} + {s.new_tokens} new "
              f"tokens (eos disabled). Repeats: {meta['warmup']} warm-up + {meta['repeats']} timed per process "
              "(load: one call per process, 1 warm-up process + repeats). Every (case, impl) in its own process.",
              "", "| probe | jax | torch |", "|---|---|---|"]
    for probe in ("matmul_f32", "matmul_bf16", "read", "copy", "stream_b8"):
        cells = []
        for impl in ("jax", "torch"):
            p = ((hardware.get(impl) or {}).get("probes") or {}).get(probe)
            cells.append(f"{_stats(p, None)} {p['unit']} (noise {_num(p['noise'])})" if p else "–")
        lines.append(f"| {probe} | {cells[0]} | {cells[1]} |")
    lines += ["", "| case | unit | trlax median (min–max) | torch median (min–max) | trlax/torch | trlax % of limit "
              "| torch % of limit | first call s trlax / torch | trlax compile s | recompiles | peak RSS MB trlax / "
              "torch | noise trlax / torch |", "|" + "---|" * 12]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        lines.append(
            f"| {r['case']} ({r['group']}) | {r['unit']} {arrow} | {_stats(r['trlax'], r['trlax_error'])} | "
            f"{_stats(r['torch'], r['torch_error'])} | {_num(r['ratio'])} | {_pct(r['trlax_fraction'])} | "
            f"{_pct(r['torch_fraction'])} | {_pair(r['trlax_first_call_s'], r['torch_first_call_s'])} | "
            f"{_num(r['trlax_compile_s_first'])} | {_num(r['trlax_compiles_after_first'])} | "
            f"{_pair(r['trlax_peak_rss_mb'], r['torch_peak_rss_mb'])} | {_pair(r['trlax_noise'], r['torch_noise'])} |")
    lines += ["", "↑ higher is better (ratio = speedup); ↓ lower is better (ratio < 1 = trlax better). "
              "% of limit: forward/train FLOP/s over the jitted jnp.dot peak of the case's dtype, generate over "
              "the decode roofline. trlax compile s: jax trace + lowering + compile time in the first call. "
              "recompiles: jax compilations after the first call (must be 0). noise: other processes' share "
              "of the CPUs during the timed repeats.", "", "| target | measured | met | margin | bound |",
              "|---|---|---|---|---|"]
    for t in targets:
        met = "–" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
        margin = "–" if t["margin"] is None else f"{t['margin']:+.0%}"
        lines.append(f"| {t['target']} | {t['measured'] or '–'} | {met} | {margin} | {t['bound']} |")
    compared = [r for r in rows if r.get("same_tokens") is not None]
    if compared:
        lines += ["", "Greedy float32 generations, both sides' new tokens: " + ", ".join(
            f"{r['case']} {'identical' if r['same_tokens'] else '**differ**'}" for r in compared) + "."]
    diffs = [r for r in rows if r.get("output_diff") is not None]
    if diffs:
        lines += ["", f"Float32 outputs, largest difference between the sides (tolerance {OUTPUT_TOLERANCE:g}; "
                  "forward: last position's first 8 logits and the value of each row; train_step: the last "
                  "step's loss): " + ", ".join(
                      f"{r['case']} {r['output_diff']:.1e}" + ("" if r["output_diff"] <= OUTPUT_TOLERANCE
                                                             else " **over**") for r in diffs) + "."]
    errors = [(r["case"], impl, r[f"{impl}_error"]) for r in rows for impl in ("trlax", "torch")
              if r[f"{impl}_error"] and r[f"{impl}_error"] != "not run"]
    if errors:
        lines += ["", "Errors:"]
        lines += [f"- {case} / {impl}: `{err.strip().splitlines()[-1]}`" for case, impl, err in errors]
    return "\n".join(lines) + "\n"
