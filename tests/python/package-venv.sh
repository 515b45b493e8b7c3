#!/usr/bin/env bash
# Builds and installs the wse_server Python package (python/) the way a user does,
# `pip install ./python` (maturin from source, no prebuilt download), into a venv with the test
# dependencies: pytest, websockets and the published wse-client 2.5.1. Idempotent: it rebuilds
# only when the package's or the engine's sources changed (a hash kept in the venv), and safe to
# run concurrently (a lock serialises it). Prints the venv's python on stdout.
#   WSE_PY_PKG_VENV     where the venv goes (default: <repo>/target/py-pkg)
#   WSE_PY_PKG_PROFILE  cargo profile of the build (default: dev; bench/scripts/compare.sh uses
#                       release, in a venv of its own)
# The dev build uses the workspace's target dir, so that the dependencies `cargo test
# --workspace` compiled are reused (cargo holds no lock on it while tests run).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${WSE_PY_PKG_VENV:-$root/target/py-pkg}"
profile="${WSE_PY_PKG_PROFILE:-dev}"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
cd "$root"
pins=(maturin==1.16.0 pytest==8.4.2 websockets==15.0.1 wse-client==2.5.1)
hash="$( { printf '%s\n' "${pins[@]}" "$profile"; find python/src python/wse_server python/Cargo.toml \
  python/pyproject.toml shards/src shards/Cargo.toml Cargo.toml Cargo.lock -type f -print0 \
  | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.wse-build-hash" 2>/dev/null)" = "$hash" ]; then
  echo "$venv/bin/python"; exit 0
fi
py=""
for c in python3.13 python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    py="$(command -v "$c")"; break
  fi
done
[ -n "$py" ] || { echo "package-venv.sh: need Python >= 3.12 on PATH or in pyenv (wse-client requires it)" >&2; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
# `python -m pip`, not `bin/pip`: a venv copied from another checkout keeps that checkout's path
# in its scripts' shebangs, and their pip would install there.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
# maturin's build backend runs the `maturin` it finds on PATH.
PATH="$venv/bin:$PATH" MATURIN_PEP517_ARGS="--profile $profile" \
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python >&2
echo "$hash" > "$venv/.wse-build-hash"
echo "$venv/bin/python"
