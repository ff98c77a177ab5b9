"""benchmarks/triton_dev.py runs as a script: every subcommand of benchmarks/triton_tools/ is on its command line
(the commands themselves need a GPU or minutes of compiling, so only the wiring is checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_dev.py"
COMMANDS = ("xcompile", "gputests", "precompile", "overhead", "fastcheck", "fwdsweep", "spread", "bwdsweep",
            "decodesweep")  # fmt: skip


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path), PYTHONSAFEPATH="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def test_every_command_is_wired(tmp_path):
    """The help lists exactly the commands; PYTHONSAFEPATH=1 (as the GPU runs set it) still finds triton_tools."""
    proc = _run("--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    choices = proc.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert tuple(choices) == COMMANDS
    for name in COMMANDS:
        proc = _run(name, "--help", tmp_path=tmp_path)
        assert proc.returncode == 0 and f"triton_dev.py {name}" in proc.stdout, proc.stderr


def test_bench_is_gone_and_says_what_replaces_it(tmp_path):
    proc = _run("bench", tmp_path=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'bench'" in proc.stderr
    assert "attnkit bench --mode fwd,bwd" in _run("--help", tmp_path=tmp_path).stdout
