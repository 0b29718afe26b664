"""Metrics of a `trlax ppo` run: JSONL (always), TensorBoard events (when tensorboardX or tensorboard is
installed) and a plot of reward and KL at the end (when matplotlib is installed)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger("trlax")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "ppo.png"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_writer(folder: Path) -> Any | None:
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard (optional deps, imported lazily), or None."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(str(folder))


class MetricsLog:
    """Appends one JSON line per step to `<dir>/metrics.jsonl`; a resumed run first drops the lines of
    steps after `start_step` (written after the state it resumes from) and any line a crash cut short,
    so the file has each step once. The file is rewritten as a whole (a new file renamed over it)."""

    def __init__(self, output_dir: Path, start_step: int = 0) -> None:
        self.path = output_dir / METRICS_FILE
        kept = [line for line in self.read_lines() if _step_of(line, self.path) <= start_step] if start_step else []
        partial = self.path.with_name(f".{METRICS_FILE}.new")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(self.path)
        self.writer = tensorboard_writer(output_dir / TENSORBOARD_DIR)

    def read_lines(self) -> list[str]:
        return [line for line in self.path.read_text().splitlines() if line.strip()] if self.path.exists() else []

    def write(self, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if name != "step":
                    self.writer.add_scalar(f"ppo/{name}", value, int(metrics["step"]))

    def history(self) -> list[dict[str, float]]:
        return [json.loads(line) for line in self.read_lines()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str, path: Path) -> float:
    """The step a metrics line records; infinity (dropped on resume, with a warning) for a line that is not
    a step's JSON object, as one a crash cut short while it was written."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        logger.warning("dropped a metrics line that is not a step's JSON record from %s: %.80s", path, line)
        return math.inf


def plot(history: list[dict[str, float]], path: Path) -> Path | None:
    """Reward and KL per step, with a moving average, to `path` (None if matplotlib is missing)."""
    try:
        import matplotlib  # optional: pip install 'trlax[plot]'

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was written (pip install 'trlax[plot]')")
        return None
    steps = [m["step"] for m in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "reward", "mean reward"), (axes[1], "kl", "KL to the reference")):
        values = [m[key] for m in history]
        window = max(1, len(values) // 10)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, values, alpha=0.35, label="per step")
        ax.plot(steps, smooth, label=f"mean of {window}")
        ax.set_xlabel("PPO step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
