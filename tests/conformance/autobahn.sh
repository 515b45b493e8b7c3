#!/usr/bin/env bash
# Vendored from the project's shared peers kit (shared/peers/autobahn.sh) so that CI, which runs
# on a fresh checkout of this repository alone, can run the RFC 6455 conformance suite.
# Autobahn|Testsuite (wstest, fuzzingclient mode) against a WebSocket *server*.
#
#   autobahn.sh [-c CASES] [-x EXCLUDE] [-a AGENT] [-t SECONDS] [URL [REPORT_DIR]]
#
#   URL         server to test                 (default ws://127.0.0.1:9001)
#   REPORT_DIR  where index.json/index.html go (default ./autobahn-report)
#   -c CASES    comma-separated case patterns  (default $AUTOBAHN_CASES or "*";
#               e.g. "1.*,2.*,5.*", "6.4.3", "9.*")
#   -x EXCLUDE  comma-separated patterns to skip (default $AUTOBAHN_EXCLUDE or none;
#               "12.*,13.*" skips the permessage-deflate cases: ~14 min against a
#               server that negotiates deflate, instant (UNIMPLEMENTED) otherwise)
#   -a AGENT    agent name in the report        (default "server")
#   -t SECONDS  wall-clock limit for wstest     (default 1800)
#
# Env: AUTOBAHN_DIR  scratch install root (default /tmp/autobahn)
#      PYTHON2       a Python 2.7 interpreter (default: python2.7 on PATH, then pyenv's 2.7.x)
#      AUTOBAHN_STRICT_CLOSE=1  also fail on a bad closing behaviour
#                               (behaviorClose FAILED / UNCLEAN / WRONG CODE)
#
# Last line printed: "autobahn: N OK, M NON-STRICT, K INFORMATIONAL, F FAILED".
# Exit: 0 no FAILED case; 1 some case FAILED; 2 setup error, server unreachable,
# or cases that wstest planned but recorded no result for (server died/hung).
# The server must already be listening. wstest only connects to URL; nothing is bound.
set -euo pipefail

CASES="${AUTOBAHN_CASES:-*}"; EXCLUDE="${AUTOBAHN_EXCLUDE:-}"; AGENT="server"; LIMIT=1800
while getopts "c:x:a:t:h" o; do
  case "$o" in
    c) CASES="$OPTARG" ;; x) EXCLUDE="$OPTARG" ;; a) AGENT="$OPTARG" ;; t) LIMIT="$OPTARG" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
URL="${1:-ws://127.0.0.1:9001}"
OUT="${2:-./autobahn-report}"
AB="${AUTOBAHN_DIR:-/tmp/autobahn}"
VENV="$AB/venv2"

# ---------------------------------------------------------------- install
# autobahntestsuite (latest 25.10.1) is Python 2.7 code pinned to autobahn 0.10.9 /
# Twisted 19.10; it does not import on Python 3. Debian bookworm ships no python2,
# but this machine image has pyenv's CPython 2.7.18.
find_py2() {
  local c
  for c in "${PYTHON2:-}" python2.7 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

mkdir -p "$AB"
exec 9>"$AB/.install.lock"; flock 9   # two runs at once: one installs, the other waits
if ! "$VENV/bin/wstest" --autobahnversion >/dev/null 2>&1; then
  echo "autobahn.sh: installing autobahntestsuite into $VENV" >&2
  PY2="$(find_py2)" || { echo "autobahn.sh: no Python 2.7 found (set PYTHON2)" >&2; exit 2; }
  # virtualenv < 20.22 can still create Python 2.7 environments; run it from Python 3.
  [ -x "$AB/tools/bin/virtualenv" ] || {
    python3 -m venv "$AB/tools" && "$AB/tools/bin/pip" install -q "virtualenv==20.21.1"; } >&2
  rm -rf "$VENV"
  "$AB/tools/bin/virtualenv" -q -p "$PY2" "$VENV" >&2
  # The exact set pip resolved for autobahntestsuite 25.10.1 on 2.7 (reproducible installs).
  cat > "$AB/constraints-py27.txt" <<'EOF'
autobahntestsuite==25.10.1
autobahn==0.10.9
Automat==22.10.0
PyHamcrest==1.10.1
Twisted==19.10.0
Werkzeug==1.0.1
argparse==1.4.0
attrs==21.4.0
cffi==1.15.1
constantly==15.1.0
cryptography==3.3.2
enum34==1.1.10
hyperlink==21.0.0
idna==2.10
incremental==16.10.1
ipaddress==1.0.23
jinja2==2.11.3
klein==17.10.0
linecache2==1.0.0
markupsafe==1.1.1
pyOpenSSL==19.1.0
pyasn1==0.5.1
pyasn1-modules==0.3.0
pycparser==2.21
service-identity==18.1.0
setuptools==44.0.0
six==1.16.0
traceback2==1.4.0
txaio==2.1.0
typing==3.10.0.0
ujson==2.0.3
unittest2==1.1.0
wsaccel==0.6.6
zope.interface==4.6.0
EOF
  # autobahn, txaio, wsaccel and PyHamcrest build from sdists (wsaccel needs gcc).
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-python-version-warning \
    -c "$AB/constraints-py27.txt" autobahntestsuite==25.10.1 >&2
  "$VENV/bin/wstest" --autobahnversion >&2
fi
exec 9>&-

# ---------------------------------------------------------------- run
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/index.json"
SPEC="$OUT/fuzzingclient.json"
"$VENV/bin/python" - "$SPEC" "$OUT" "$AGENT" "$URL" "$CASES" "$EXCLUDE" <<'EOF'
import json, sys
spec, out, agent, url, cases, exclude = sys.argv[1:]
split = lambda s: [p.strip() for p in s.split(",") if p.strip()]
json.dump({"outdir": out, "servers": [{"agent": agent, "url": url}],
           "cases": split(cases), "exclude-cases": split(exclude),
           "exclude-agent-cases": {}}, open(spec, "w"), indent=2)
EOF

start=$(date +%s)
rc=0
( cd "$OUT" && timeout "$LIMIT" "$VENV/bin/wstest" -m fuzzingclient -s "$SPEC" ) \
  > "$OUT/wstest.log" 2>&1 || rc=$?
secs=$(( $(date +%s) - start ))
if [ "$rc" -ne 0 ]; then
  echo "autobahn.sh: wstest exited $rc after ${secs}s (124 = hit the -t limit); see $OUT/wstest.log" >&2
  tail -n 5 "$OUT/wstest.log" >&2
fi

# ---------------------------------------------------------------- summary
"$VENV/bin/python" - "$OUT" "$AGENT" "$secs" "$rc" "$URL" <<'EOF'
import json, os, re, sys
out, agent, secs, rc, url = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
log = open(os.path.join(out, "wstest.log")).read()
m = re.search(r"will run (\d+) test cases", log)
planned = int(m.group(1)) if m else None
try:
    res = json.load(open(os.path.join(out, "index.json"))).get(agent, {})
except (IOError, ValueError):
    res = {}
def key(c):
    return [int(x) for x in c.split(".")]
count = {}
for v in res.values():
    count[v["behavior"]] = count.get(v["behavior"], 0) + 1
failed = sorted([c for c, v in res.items() if v["behavior"] == "FAILED"], key=key)
badclose = sorted([c for c, v in res.items() if v["behavior"] != "FAILED"
                   and v["behaviorClose"] in ("FAILED", "UNCLEAN", "WRONG CODE")], key=key)
missing = (planned - len(res)) if planned is not None else 0
other = sorted((k, n) for k, n in count.items()
               if k not in ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED"))
detail = "%d/%s cases recorded in %ds" % (len(res), planned if planned is not None else "?", secs)
if other:
    detail += "; " + ", ".join("%d %s" % (n, k) for k, n in other)
if badclose:
    detail += "; %d more with a bad close: " % len(badclose) + " ".join(badclose[:20]) + (
        " ..." if len(badclose) > 20 else "")
if failed:
    detail += "; FAILED: " + " ".join(failed[:40]) + (" ..." if len(failed) > 40 else "")
if "Connection to" in log and "failed" in log:
    detail += "; " + [l for l in log.splitlines() if l.startswith("Connection to")][0]
print("autobahn: %s; report %s/index.html" % (detail, out))
print("autobahn: %d OK, %d NON-STRICT, %d INFORMATIONAL, %d FAILED"
      % (count.get("OK", 0), count.get("NON-STRICT", 0), count.get("INFORMATIONAL", 0), len(failed)))
if not res or missing > 0 or planned is None:
    sys.stderr.write("autobahn.sh: %s results missing for %s (server unreachable, died or hung?)\n"
                     % (missing if res else "all", url))
    sys.exit(2)
if failed:
    sys.exit(1)
if badclose and os.environ.get("AUTOBAHN_STRICT_CLOSE") == "1":
    sys.exit(1)
EOF
