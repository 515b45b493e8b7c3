#!/usr/bin/env bash
# Installs the published Centrifuge JavaScript client (centrifuge 5.7.4, with ws 8.18.3 as its
# WebSocket under Node 20) from the npm registry, exactly as package-lock.json pins it, for
# tests/centrifuge_server.rs and tests/centrifuge_session.rs. Idempotent and safe to run concurrently (a lock serialises installs).
#   CENTRIFUGE_JS_DIR  where it goes (default: <repo>/target/centrifuge-js)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${CENTRIFUGE_JS_DIR:-$here/../../target/centrifuge-js}"
mkdir -p "$dir"
exec 9>"$dir.lock"
flock 9
command -v node >/dev/null 2>&1 || { echo "setup-centrifuge-js.sh: need node and npm" >&2; exit 2; }
# Up to date when the lock file it was installed from is this one.
if cmp -s "$here/package-lock.json" "$dir/package-lock.json" && [ -d "$dir/node_modules/centrifuge" ]; then
  exit 0
fi
cp "$here/package.json" "$here/package-lock.json" "$dir/"
npm ci --prefix "$dir" --no-audit --no-fund --silent
node -e 'console.error("centrifuge", require(process.argv[1] + "/node_modules/centrifuge/package.json").version)' "$dir"
