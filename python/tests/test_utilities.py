"""Upstream's module-level names other than the server (hashing, zlib, AES-GCM, ECDH, token
bucket, sequencers, priority queues, the event filter, the enums) behave as upstream 2.5.1's on
the same inputs: `utilities_scenario.py` runs on upstream's package (its own venv, since both
install `wse_server`) and on ours, and every line must agree. Ciphertexts and keypairs each side
made are read by the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCENARIO = Path(__file__).with_name("utilities_scenario.py")


def scenario(python: str, artifacts: list) -> tuple[list[str], dict]:
    out = subprocess.run([python, str(SCENARIO), json.dumps(artifacts)], capture_output=True,
                         text=True, timeout=120, cwd=SCENARIO.parent,
                         env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("ARTIFACTS "), lines[-1]
    return lines[:-1], json.loads(lines[-1].split(" ", 1)[1])


def test_same_results_as_upstream(upstream_python: str) -> None:
    _, theirs = scenario(upstream_python, [])
    _, ours = scenario(sys.executable, [])
    expected, _ = scenario(upstream_python, [theirs, ours])
    got, _ = scenario(sys.executable, [theirs, ours])
    assert len(got) == len(expected)
    differ = [(e, g) for e, g in zip(expected, got) if e != g]
    assert not differ, "\n".join(f"upstream: {e}\nours:     {g}" for e, g in differ)
    # The scenario did reach the end with the foreign artifacts read.
    assert any(line.startswith("foreign 1 gcm: b'wse end-to-end") for line in got)
