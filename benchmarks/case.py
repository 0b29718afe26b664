"""Run ONE (case, implementation) in this process and print its result line.

    python benchmarks/case.py --impl trlax|torch --case NAME --model-dir DIR [--quick]
        [--device cpu|gpu] [--f32-matmul default|highest] [--warmup 1] [--repeats 5]

The orchestrator (run.py) launches one of these per case and implementation, so no
case sees another's compiled code, allocator state or peak RSS. The result holds the
import time, the first call (compile for trlax) and warm-up calls apart from the timed
repeats, the compile counts after the first call, other processes' CPU share during the
timed repeats, and the peak RSS (and GPU peak) of the whole process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import BY_NAME, FULL_SHAPES, MODELS, QUICK_MODELS, QUICK_SHAPES  # noqa: E402
from common import CompileCounter, Context, emit, measure, peak_rss_mb, rss_mb  # noqa: E402
from env import configure_framework, set_env  # noqa: E402


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    case = BY_NAME[args.case]
    set_env(args.impl, args.device)
    module = importlib.import_module(f"cases_{args.impl}")
    module.preimport(case)
    settings = configure_framework(args.impl, args.device, args.f32_matmul)
    device_name = module.init_device(args.device)
    import_s = time.perf_counter() - start
    counter = CompileCounter()
    module.install_counter(counter)
    baseline = rss_mb()
    models = QUICK_MODELS if args.quick else MODELS
    ctx = Context(case=case, model_dir=os.path.join(args.model_dir, case.model), cfg=dict(models[case.model]),
                  shapes=QUICK_SHAPES if args.quick else FULL_SHAPES, device=args.device, rss_baseline_mb=baseline)
    result: dict[str, Any] = {
        "case": case.name, "impl": args.impl, "device": args.device, "device_name": device_name,
        "dtype": case.dtype, "quick": args.quick, "settings": settings, "import_s": round(import_s, 3),
        "rss_after_import_mb": round(baseline, 1), "warmup": args.warmup, "repeats": args.repeats,
    }
    try:
        setup_start = time.perf_counter()
        bench = module.CASES[case.kind](ctx)
        result["setup_s"] = round(time.perf_counter() - setup_start, 3)
        if bench.static is not None:
            result["static"] = bench.static
        else:
            result.update(measure(bench, args.warmup, args.repeats, counter))
            result["work_per_call"] = bench.work
        result["extra"] = bench.extra
    except Exception:  # reported in the table; the other cases still run
        result["error"] = traceback.format_exc()[-3000:]
    if args.impl == "torch":  # eager: nothing to count
        for key in ("compiles_first", "traces_first", "compile_s_first", "compiles_after_first", "traces_after_first"):
            result[key] = None
    peak = peak_rss_mb()
    result["peak_rss_mb"] = round(peak, 1)
    result["peak_rss_above_import_mb"] = round(peak - baseline, 1)
    result["device_peak_mb"] = module.device_peak_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("trlax", "torch"), required=True)
    parser.add_argument("--case", choices=sorted(BY_NAME), required=True)
    parser.add_argument("--model-dir", required=True, help="folder holding the checkpoints (small/, tiny/)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--f32-matmul", choices=("default", "highest"), default="default")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    emit(run_case(parser.parse_args()))


if __name__ == "__main__":
    main()
