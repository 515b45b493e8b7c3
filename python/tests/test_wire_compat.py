"""What a real client receives from broadcast (any text), send_event and disconnect is what
upstream 2.5.1 sends it: `wire_scenario.py` runs under upstream's package and under ours
(separate processes: both install `wse_server`), and the lines must agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("wire_scenario.py")


def scenario(python: str) -> list[str]:
    out = subprocess.run([python, str(SCENARIO)], capture_output=True, text=True, timeout=120,
                         cwd=SCENARIO.parent, env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.splitlines()


@pytest.fixture(scope="module")
def ours() -> list[str]:
    return scenario(sys.executable)


def test_what_ours_sends(ours: list[str]) -> None:
    """The behaviours themselves, on ours alone (the comparison below needs upstream's venv)."""
    # Text that is not a JSON object goes as it is, in the topic's order, and is replayed.
    assert "broadcast -> text 'plain text'" in ours
    assert "broadcast -> text [1,2]" in ours
    assert "broadcast -> text ''" in ours
    assert "replay -> text 'local plain'" in ours
    assert ours.index("broadcast -> text 'plain text'") == 1
    # It takes an offset: the next object is two after the first.
    assert ours[2].startswith('broadcast -> text {"tp":"feed","e":"EPOCH","o":"first+2",'
                              '"c":"U","x":1,"t":"a"}')
    assert "recovered True True 10" in ours
    # send_event: binary frames, JSON or C: + zlib; a repeated id sends nothing.
    assert ('send_event -> binary {"c":"U","id":"x1","p":{"a":1},"seq":"SEQ","t":"ev",'
            '"ts":"TS","v":1}') in ours
    assert any(line.startswith("send_event -> binary C: ") for line in ours)
    assert "send_event again returned 0" in ours
    # disconnect: a close frame without status, 1005 for the client.
    assert ours[-1] == "disconnect -> close (<CloseCode.NO_STATUS_RCVD: 1005>, '')"


def test_same_frames_as_upstream(ours: list[str], upstream_python: str) -> None:
    theirs = scenario(upstream_python)
    differ = [(t, o) for t, o in zip(theirs, ours) if t != o]
    assert not differ, "\n".join(f"upstream: {t}\nours:     {o}" for t, o in differ)
    assert len(ours) == len(theirs), (theirs, ours)


SERIES = r"""
import os, re, socket
os.environ.setdefault("WSE_CORES", "2")
from wse_server import RustWSEServer
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
srv = RustWSEServer("127.0.0.1", port, recovery_enabled=True, presence_enabled=True)
srv.start()
for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", srv.prometheus_metrics(), re.M):
    print(name, kind)
srv.stop()
"""


def test_prometheus_series_are_upstreams(upstream_python: str) -> None:
    """Every series upstream exports, under its name and type, in its order. Their values on
    ours: test_server.py."""
    def series(python: str) -> list[str]:
        out = subprocess.run([python, "-c", SERIES], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=""))
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    theirs, ours = series(upstream_python), series(sys.executable)
    assert len(ours) > 20 and "wse_topics gauge" in ours
    # wse_topic_messages_total is listed once a topic has had a publication (none here), by
    # both; test_server.py has it.
    assert ours == theirs
