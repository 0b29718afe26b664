"""trlax vs transformers (PyTorch), every case of issue 9, in one command.

    python benchmarks/run.py [--quick] [--cases a,c,forward,...] [--out results.json] [--device cpu|gpu]

1. writes the checkpoints (GPT-2 small and the tiny model, random weights, saved by
   PyTorch with a TRL value head) into a temporary folder (or --model-dir);
2. probes the machine's limits (hardware.py: jitted jnp.dot / torch.mm peak, read and
   copy bandwidth), one process per framework;
3. runs each (case, implementation) in its own process (case.py), trlax then torch case
   by case, retrying a run whose timed section saw more than --max-noise of the CPUs
   used by other processes and keeping the cleanest attempt;
4. prints one markdown table (report.py) and writes every result as JSON (--out) and
   the table beside it (.md); each process's stderr goes to <out>.logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import FULL_SHAPES, MODELS, QUICK_MODELS, QUICK_SHAPES, Case, select  # noqa: E402
from common import parse_result  # noqa: E402
from env import cpu_threads  # noqa: E402
from report import build_rows, check_targets, markdown, metric_stats  # noqa: E402

PACKAGES = ("trlax", "jax", "jaxlib", "flax", "optax", "torch", "transformers", "safetensors", "peft", "trl", "numpy")


# --- machine description -------------------------------------------------------------------------


def _cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == (platform.processor() or "unknown CPU"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    have = [f for f in wanted if f in flags]
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f" {int(f.readline().split()[1]) / 2**20:.0f} GiB RAM,"
    except OSError:
        pass
    return f"{model}, {cpu_threads()} CPUs,{mem} flags {' '.join(have) or 'n/a'}"


def _gpu_description() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    # An editable install's metadata keeps the version it was installed at; the source says what runs.
    source = re.search(r'^__version__ = "([^"]+)"', (HERE.parent / "trlax" / "__init__.py").read_text(), re.M)
    if source:
        out["trlax"] = source.group(1)
    return out


def _git_commit() -> str | None:
    out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() or None


# --- subprocesses --------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run one benchmark process; its result line, or {"error": ...} with the end of its stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"$ {' '.join(cmd)}\nTIMEOUT after {timeout} s\n{e.stderr or ''}")
        return {"error": f"timed out after {timeout} s"}
    log.write_text(f"$ {' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    result = parse_result(proc.stdout)
    if result is None:
        return {"error": f"exit {proc.returncode}, no result line; stderr: {proc.stderr[-2000:]}"}
    return result


def _case_cmd(args: argparse.Namespace, case: Case, impl: str, model_dir: str, warmup: int, repeats: int) -> list:
    cmd = [sys.executable, str(HERE / "case.py"), "--impl", impl, "--case", case.name, "--model-dir", model_dir,
           "--device", args.device, "--f32-matmul", args.f32_matmul, "--warmup", str(warmup),
           "--repeats", str(repeats)]
    return cmd + (["--quick"] if args.quick else [])


def _with_retries(args: argparse.Namespace, cmd: list[str], log: Path, noise_key: str) -> dict[str, Any]:
    """Run, and rerun while the timed section was noisy (> --max-noise); keep the cleanest attempt."""
    attempts = []
    for attempt in range(1 + args.retries):
        result = _run(cmd, log.with_suffix(f".{attempt}.log"), args.timeout)
        attempts.append(result)
        noise = result.get(noise_key)
        if result.get("error") or noise is None or noise <= args.max_noise:
            break
    ok = [r for r in attempts if not r.get("error")]
    best = min(ok, key=lambda r: r.get(noise_key) or 0.0) if ok else attempts[-1]
    best["attempts"] = len(attempts)
    best["attempt_noise"] = [r.get(noise_key) for r in attempts]
    return best


def run_case(args: argparse.Namespace, case: Case, impl: str, model_dir: str, logs: Path) -> dict[str, Any]:
    """One (case, impl): a process with warm-up + repeats, or for per-process cases (load) one
    cold warm-up process plus `repeats` processes of one call each, pooled."""
    log = logs / f"{case.name}-{impl}"
    if not case.per_process:
        return _with_retries(args, _case_cmd(args, case, impl, model_dir, args.warmup, args.repeats), log, "noise")
    cmd = _case_cmd(args, case, impl, model_dir, 0, 0)
    runs = [_with_retries(args, cmd, log.with_name(f"{log.name}-p{i}"), "noise_first")
            for i in range(1 + args.repeats)]
    failed = [r for r in runs if r.get("error")]
    if failed:
        return failed[0]
    cold, timed = runs[0], runs[1:]

    def med(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    pooled = dict(timed[0])
    pooled.update(
        times_s=[r["first_call_s"] for r in timed], first_call_s=cold["first_call_s"], warmup_s=[],
        noise=max((r["noise_first"] or 0.0) for r in timed), import_s=med("import_s"), peak_rss_mb=med("peak_rss_mb"),
        peak_rss_above_import_mb=med("peak_rss_above_import_mb"), rss_after_import_mb=med("rss_after_import_mb"),
        attempts=sum(r["attempts"] for r in runs), processes=len(runs),
        compiles_after_first=None,  # one call per process: nothing after the first to count
        extra={**timed[0]["extra"], "from_pretrained_s": [r["extra"].get("from_pretrained_s") for r in timed],
               "cold_process_first_call_s": cold["first_call_s"]})
    return pooled


def probe_hardware(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    out = {}
    for impl in args.impls:
        framework = "jax" if impl == "trlax" else "torch"
        cmd = [sys.executable, str(HERE / "hardware.py"), "--impl", framework, "--device", args.device,
               "--f32-matmul", args.f32_matmul] + (["--quick"] if args.quick else [])
        out[framework] = _run(cmd, logs / f"hardware-{framework}.log", args.timeout)
        print(f"hardware {framework}: " + ", ".join(
            f"{k} {v['median']:.1f} {v['unit']}" for k, v in (out[framework].get("probes") or {}).items()
            if isinstance(v, dict)) or out[framework].get("error", ""), file=sys.stderr, flush=True)
    return out


def build_checkpoints(args: argparse.Namespace, folder: Path, logs: Path) -> dict[str, Any]:
    marker = folder / "checkpoints.json"
    if marker.exists():
        made = json.loads(marker.read_text())
        if made.get("quick") == args.quick:
            return made["models"]
    cmd = [sys.executable, str(HERE / "make_checkpoints.py"), "--out", str(folder)]
    cmd += ["--quick"] if args.quick else []
    result = _run(cmd, logs / "make_checkpoints.log", args.timeout)
    if "error" in result:
        raise SystemExit(f"could not write the checkpoints: {result['error']}")
    marker.write_text(json.dumps({"quick": args.quick, "models": result}))
    return result


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny stand-in model and shapes, 1 warm-up + 2 repeats, no retries")
    parser.add_argument("--cases", help="comma-separated case names and/or group letters a-h (default: all)")
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/<device>[-quick].json); "
                                      "the markdown table is written beside it (.md)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--impls", default="trlax,torch", help="which sides to run (default both)")
    parser.add_argument("--repeats", type=int, help="timed repeats per process (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up calls after the first call (default 1)")
    parser.add_argument("--max-noise", type=float, default=0.05,
                        help="retry a run whose timed section saw more than this share of CPUs used by others")
    parser.add_argument("--retries", type=int, help="reruns of a noisy run (default 2; --quick 0)")
    parser.add_argument("--f32-matmul", choices=("default", "highest"), default="default",
                        help="GPU float32 matmuls: default = TF32 allowed in both stacks; highest = IEEE f32 in both")
    parser.add_argument("--model-dir", help="keep the checkpoints here (reused when present) instead of a temp dir")
    parser.add_argument("--no-hardware", action="store_true", help="skip the hardware probes (no %% of limit)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per process")
    args = parser.parse_args()
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    args.retries = args.retries if args.retries is not None else (0 if args.quick else 2)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not set(args.impls) <= {"trlax", "torch"}:
        raise SystemExit("--impls takes trlax and/or torch")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1 (the issue asks for >= 5)")
    return args


def main() -> None:
    args = parse_args()
    cases = select(args.cases)
    out = Path(args.out or HERE / "results" / f"{args.device}{'-quick' if args.quick else ''}.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_suffix(".logs")
    logs.mkdir(exist_ok=True)
    temp = None if args.model_dir else tempfile.mkdtemp(prefix="trlax-bench-")
    model_dir = Path(args.model_dir or temp)
    model_dir.mkdir(parents=True, exist_ok=True)
    try:
        checkpoints = build_checkpoints(args, model_dir, logs)
        hardware = {} if args.no_hardware else probe_hardware(args, logs)
        results: dict[str, dict[str, Any]] = {}
        total = len(cases) * len(args.impls)
        for case in cases:
            results[case.name] = {}
            for impl in args.impls:
                result = run_case(args, case, impl, str(model_dir), logs)
                results[case.name][impl] = result
                stats = metric_stats(case, result)
                done = sum(len(v) for v in results.values())
                status = (f"{stats['median']:.4g} {case.unit}" if stats else
                          "ERROR " + str(result.get("error", "")).strip().splitlines()[-1][:200])
                print(f"[{done}/{total}] {case.name} {impl}: {status} (noise {result.get('noise')})",
                      file=sys.stderr, flush=True)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
        "device": args.device, "machine": _cpu_description() + (f"; GPU {g}" if (g := _gpu_description()) else ""),
        "versions": _versions(), "git_commit": _git_commit(), "argv": sys.argv[1:], "warmup": args.warmup,
        "repeats": args.repeats, "max_noise": args.max_noise, "f32_matmul": args.f32_matmul,
        "models": dict(QUICK_MODELS if args.quick else MODELS), "shapes": shapes,
        "checkpoint_bytes": {size: info["bytes"] for size, info in checkpoints.items()},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # inherited by the trlax side only; "" = XLA's defaults
    }
    rows = build_rows(results, hardware, meta)
    targets = check_targets(rows, meta)
    table = markdown(rows, targets, hardware, meta)
    print(table)
    meta["shapes"] = dataclasses.asdict(shapes)
    out.write_text(json.dumps({"meta": meta, "hardware": hardware, "results": results, "rows": rows,
                               "targets": targets, "markdown": table}, indent=1, default=str))
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}; logs in {logs}", file=sys.stderr)


if __name__ == "__main__":
    main()
