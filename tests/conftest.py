import atexit
import os
import shutil
import tempfile

# Tests never reach the network; hub code paths run against local caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The suite's tiny models spend far longer in XLA's compiler than running; set before JAX starts,
# inherited by pytest-xdist's workers and by every subprocess a test starts (tests.helpers.subprocess_env):
# - XLA:CPU's classic fusion emitter and LLVM at -O0: the HLO passes (fusion, layouts, the order of
#   every reduction) are unchanged, only the machine code is built more simply. A tiny model compiles
#   4.6x faster (2.3 s -> 0.5 s for the gpt2, llama and falcon configs on a 2-core Xeon); logits move
#   by float32 rounding (<= 1.2e-7 over eight families) and sampled tokens stay the same. Benchmarks
#   and `trlax` itself keep XLA's defaults.
# - one persistent compilation cache for the whole run, so the same program (a CLI run started again
#   after a kill, a notebook, a worker) is compiled once; it is deleted when the run ends.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="trlax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
