"""What `trlax demo` prints and writes: samples, the reward summary, metrics.json and ppo_demo.png."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.json"
PLOT_FILE = "ppo_demo.png"
PLOTTED = (("reward", "mean reward"), ("kl", "KL to reference (nats / reply)"), ("value_loss", "value loss"))


def print_samples(title: str, samples: list[dict[str, Any]], legend: str = "") -> None:
    print(f"\nsamples {title} (prompt | reply -> reward{'; ' + legend if legend else ''}):")
    prompts, replies = [repr(s["prompt"]) for s in samples], [repr(s["reply"]) for s in samples]
    pw, rw = max(map(len, prompts)), max(map(len, replies))
    for prompt, reply, s in zip(prompts, replies, samples, strict=True):
        print(f"  {prompt:>{pw}} | {reply:<{rw}} -> {s['reward']:.2f}", flush=True)  # before the bar (stderr)


def reward_summary(history: list[dict[str, float]]) -> dict[str, Any]:
    """Mean reward over the first and last 10% of steps (at least one step each), and final KL / value loss."""
    n = len(history)
    window = max(1, n // 10)
    first = [m["reward"] for m in history[:window]]
    last = [m["reward"] for m in history[-window:]]
    start, end = float(np.mean(first)), float(np.mean(last))
    return {"steps": n, "window": window, "reward_start": start, "reward_end": end, "reward_rise": end - start,
            "kl_end": float(np.mean([m["kl"] for m in history[-window:]])),
            "value_loss_end": float(np.mean([m["value_loss"] for m in history[-window:]]))}


def print_summary(history: list[dict[str, float]], wall_seconds: float) -> dict[str, Any]:
    summary = reward_summary(history)
    summary["wall_seconds"] = wall_seconds
    n, w = summary["steps"], summary["window"]
    print(f"\nsummary: mean reward {summary['reward_start']:.3f} over the first {w} step(s) -> "
          f"{summary['reward_end']:.3f} over the last {w} (steps {n - w + 1}-{n}): "
          f"{summary['reward_rise']:+.3f}")
    print(f"         KL to the reference at the end {summary['kl_end']:.2f} nats per reply; "
          f"value loss {summary['value_loss_end']:.4f}; {n} steps, {wall_seconds:.0f} s from model build to "
          "the end (compilation included)")
    return summary


def write_metrics(output_dir: Path, log: dict[str, Any], summary: dict[str, Any] | None, config: Any,
                  models: Any) -> Path:
    """metrics.json: config, summary, per-step metrics and samples (those known so far: a run
    in progress has no summary or samples_after yet). Replaced atomically, so an interrupted
    run leaves the last complete version."""
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"model": models.description, "reward_rule": models.task.description,
              "shared_layers": models.shared_layers, "config": dataclasses.asdict(config), "summary": summary,
              "steps": log["history"], "samples_before": log.get("samples_before"),
              "samples_after": log.get("samples_after")}
    metrics = output_dir / METRICS_FILE
    partial = output_dir / f".{METRICS_FILE}.partial"
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, metrics)
    return metrics


def write_outputs(output_dir: Path, log: dict[str, Any], summary: dict[str, Any], config: Any,
                  models: Any) -> list[Path]:
    """metrics.json (config, summary, per-step metrics, samples) and, with matplotlib, ppo_demo.png."""
    written = [write_metrics(output_dir, log, summary, config, models)]
    try:
        written.append(plot_metrics(log["history"], output_dir / PLOT_FILE, title=models.task.description))
    except ImportError:
        print("note: matplotlib is not installed, so no plot was written (pip install 'trlax[plot]')")
    return written


def plot_metrics(history: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """Reward, KL and value loss per step, one panel each (a 10-step moving average over the raw values)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    steps = np.array([m["step"] for m in history]) + 1
    fig, axes = plt.subplots(len(PLOTTED), 1, figsize=(7, 7), sharex=True)
    for ax, (key, label) in zip(axes, PLOTTED, strict=True):
        values = np.array([m[key] for m in history])
        ax.plot(steps, values, color="0.7", linewidth=0.8, label="per step")
        if len(values) >= 10:
            smooth = np.convolve(values, np.ones(10) / 10, mode="valid")
            ax.plot(steps[9:], smooth, color="C0", linewidth=1.8, label="10-step mean")
        if key == "value_loss" and values.min() > 0:
            ax.set_yscale("log")  # the first steps' loss is orders of magnitude above the rest
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(f"trlax demo: PPO\nreward = {title}" if title else "trlax demo: PPO", fontsize=9)
    axes[-1].set_xlabel("PPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
