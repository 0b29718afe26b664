"""The command-line scripts beside the package (benchmarks/, examples/) answer --help and write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("benchmarks", "examples") for p in (ROOT / folder).glob("*.py")
                 if "argparse" in p.read_text() and 'if __name__ == "__main__"' in p.read_text())
# These import jax and the models before parsing their arguments (seconds, not milliseconds).
IMPORT_FIRST = {"moe_forward.py", "multihost_ppo.py"}


@pytest.mark.parametrize("script", [
    pytest.param(p, id=f"{p.parent.name}/{p.name}", marks=[pytest.mark.slow] if p.name in IMPORT_FIRST else [])
    for p in SCRIPTS
])
def test_script_help_prints_usage_and_writes_nothing(script: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    assert list(tmp_path.iterdir()) == []  # e.g. not a folder named "--help"


def test_every_script_parses_its_arguments_with_argparse() -> None:
    # A script that reads sys.argv by hand takes "--help" for an argument (a folder was written so).
    mains = sorted(p for folder in ("benchmarks", "examples") for p in (ROOT / folder).glob("*.py")
                   if 'if __name__ == "__main__"' in p.read_text())
    assert [p.name for p in mains if p not in SCRIPTS] == []
