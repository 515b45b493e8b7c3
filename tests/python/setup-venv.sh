#!/usr/bin/env bash
# Creates the Python venv the wire-compatibility tests use: the published wse-client 2.5.1 and
# the upstream wse-server 2.5.1 (the independent server the Rust client is checked against,
# run by upstream_server.py), unmodified, on Python >= 3.12 (found on PATH or via pyenv), plus
# the packages of the Python example backends (examples/python-chat/requirements.txt,
# examples/token-bowl/requirements.txt) and the
# published Centrifuge clients: centrifuge-python 0.7.0 (tests/python/centrifuge_client.py) and
# token-bowl-chat 4.0.2 (tests/python/token_bowl_client.py); and cent 5.2.0, Centrifugo's HTTP API
# client (tests/python/cent_api.py).
# Idempotent and safe to run concurrently (a lock serialises installs).
#   WSE_PY_VENV  where the venv goes (default: <repo>/target/py-venv)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${WSE_PY_VENV:-$here/../../target/py-venv}"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
reqs="$here/../../examples/python-chat/requirements.txt"
reqs_token_bowl="$here/../../examples/token-bowl/requirements.txt"
# Up to date when every pinned package is installed at its pin.
if "$venv/bin/python" - "$reqs" "$reqs_token_bowl" 2>/dev/null <<'PY'; then
import sys, importlib.metadata as md
want = {
    "wse-client": "2.5.1",
    "wse-server": "2.5.1",
    "centrifuge-python": "0.7.0",
    "token-bowl-chat": "4.0.2",
    "cent": "5.2.0",
}
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            want[name] = version
sys.exit(any(md.version(n) != v for n, v in want.items()))
PY
  exit 0
fi
py=""
for c in python3.13 python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    py="$(command -v "$c")"; break
  fi
done
[ -n "$py" ] || { echo "setup-venv.sh: need Python >= 3.12 (wse-client and wse-server require it)" >&2; exit 2; }
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "wse-client==2.5.1" "wse-server==2.5.1" \
  "centrifuge-python==0.7.0" "token-bowl-chat==4.0.2" "cent==5.2.0" -r "$reqs" -r "$reqs_token_bowl"
"$venv/bin/python" -c 'import wse_client, wse_server; print("wse-client", wse_client.__version__)' >&2
