"""Per-process framework setup, identical for the hardware probes and the cases.

`set_env` must run before jax or torch is imported (platform selection is read at
import); `configure_framework` runs after the import and returns the settings it applied,
recorded with every result.

float32 matmuls on GPU: JAX's default precision lets XLA use TF32 on Ampere and later;
PyTorch's default does not. `--f32-matmul default` gives PyTorch the same allowance
(`set_float32_matmul_precision("high")`), `highest` forbids it in both. On CPU neither
has TF32, and the setting changes nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def cpu_threads() -> int:
    """CPUs this process may run on (the container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_env(impl: str, device: str) -> None:
    """Select the platform before any framework import."""
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # neither stack may touch a GPU in a CPU run
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cuda")
    # Offline, quiet: no hub calls, no warnings or progress bars in the timed sections.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars inside timed loads (both stacks use tqdm)


def configure_framework(impl: str, device: str, f32_matmul: str) -> dict[str, Any]:
    """Thread count / matmul precision of the framework `impl` uses; returns what was set."""
    if impl == "torch":
        import torch

        settings: dict[str, Any] = {"torch": torch.__version__}
        if device == "cpu":
            torch.set_num_threads(cpu_threads())
            settings["torch_threads"] = torch.get_num_threads()
        else:
            torch.set_float32_matmul_precision("high" if f32_matmul == "default" else "highest")
            torch.backends.cudnn.allow_tf32 = f32_matmul == "default"
            settings["torch_f32_matmul_precision"] = torch.get_float32_matmul_precision()
        return settings
    import jax

    if f32_matmul == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")
    # transformers 5 imports torch whenever it is installed (modeling_rope_utils), trlax's import with it.
    return {"jax": jax.__version__, "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
            "jax_f32_matmul": f32_matmul, "torch_imported": "torch" in sys.modules}


def configure_process(impl: str, device: str, f32_matmul: str) -> dict[str, Any]:
    """set_env + configure_framework, for processes that do not time their imports."""
    set_env(impl, device)
    return configure_framework(impl, device, f32_matmul)
