import atexit
import gc
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

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
#   and `trlax` itself keep XLA's defaults. Each program's machine code in one LLVM module instead of a split
#   for parallel code generation: 15% less compile time here, and each module registers its unwind tables
#   with libgcc, whose lookups walk every module registered in the process (libgcc < 13): up to 16% of a
#   long-lived worker's time went to `_Unwind_Find_FDE` (perf, 4 test files in one process).
# - one persistent compilation cache for the whole run, so the same program (a CLI run started again
#   after a kill, a notebook, a worker) is compiled once; it is deleted when the run ends. Only programs
#   that took 0.3 s or more to compile are written: writing an entry cost ~0.04 s, about what reading one
#   back saves for the thousands of small programs (JAX's own compile_time_saved summed to -3 s over a
#   worker's 744 cache hits), while the large PPO and generate programs a CLI rerun needs are kept.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                  "--xla_cpu_parallel_codegen_split_count=1")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="trlax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import jax  # noqa: E402 - after the XLA flags above are set


def pytest_collection_finish(session: pytest.Session) -> None:
    """The modules, models and configs collection built live for the whole run: out of the cyclic garbage
    collector's way (its full collections walked them, up to 15% of a worker's time late in a run)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def free_compiled_programs_after_each_module() -> Iterator[None]:
    """A module's models are gone when it ends; their compiled programs (and the unwind tables they register)
    go with them, instead of accumulating in the worker for the rest of the run."""
    yield
    jax.clear_caches()
    gc.collect()
