"""Run a script as several JAX processes on this machine, the way a pod runs it on several hosts.

Each process gets `devices` simulated CPU devices, the coordinator on a free localhost
port (passed as `--coordinator HOST:PORT --num-processes N --process-id I`) and the
`gloo` CPU collectives; together they form one global mesh of N x devices. Each process
runs in its own process group with its output in a log file. The first process to fail
ends the run: the others are killed (a peer waiting in a collective would otherwise hang),
and so are all of them when the timeout passes; the test then fails with every log's tail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL = 3000  # characters of each process's log shown when a run fails


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it moments later)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    # gloo reports every connection it makes; those lines say nothing about a failure.
    lines = [line for line in text.splitlines() if not line.startswith("[Gloo]")]
    return "\n".join(lines)[-LOG_TAIL:]


def _kill(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own group: the process and any children
    for proc in procs:
        proc.wait()


def run_processes(
    command: Sequence[str], log_dir: Path, *, num_processes: int = 2, devices: int = 4, timeout: float = 300,
) -> list[str]:
    """Run `python *command --coordinator ... --process-id I` as `num_processes` processes; their logs.

    Fails the calling test (never hangs past `timeout` seconds) when a process exits with
    an error or the run takes too long.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    coordinator = f"localhost:{free_port()}"
    env = subprocess_env(devices, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                         # glibc hands large freed blocks back to the OS at once, so RSS tracks live memory.
                         MALLOC_MMAP_THRESHOLD_="65536")
    logs = [log_dir / f"process{i}.log" for i in range(num_processes)]
    procs: list[subprocess.Popen] = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, *command, "--coordinator", coordinator, "--num-processes", str(num_processes),
                     "--process-id", str(i)],
                    env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                running = [i for i, p in enumerate(procs) if p.poll() is None]
                _kill(procs)
                what = (f"process {failed[0]} exited with status {procs[failed[0]].returncode}" if failed
                        else f"timed out after {timeout:.0f}s")
                pytest.fail(f"{' '.join(command)}: {what}; killed the processes still running {running}.\n"
                            + "\n".join(f"--- process {i} log ---\n{_tail(log)}" for i, log in enumerate(logs)),
                            pytrace=False)
            time.sleep(0.2)
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            pytest.fail(f"{' '.join(command)}: process {failed[0]} exited with status {procs[failed[0]].returncode}.\n"
                        + "\n".join(f"--- process {i} log ---\n{_tail(log)}" for i, log in enumerate(logs)),
                        pytrace=False)
    finally:
        _kill(procs)
    return [log.read_text(errors="replace") for log in logs]
