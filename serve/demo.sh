#!/usr/bin/env bash
# The last step of the README's main job: start `bentoml serve` on 127.0.0.1, wait until it is ready,
# send one sample request with curl and show it with its answer, then keep serving until Ctrl-C.
#
#   bash serve/demo.sh            # serve on 127.0.0.1:3000 (PORT=... to change)
#   bash serve/demo.sh --once     # stop after the sample request (scripts, CI)
#   PORT=3001 LOG=/tmp/serve.log bash serve/demo.sh --once
set -euo pipefail
cd "$(dirname "$0")/.."  # bentoml serve finds bentofile.yaml in the repository root
export BENTOML_DO_NOT_TRACK=true
port="${PORT:-3000}"
log="${LOG:-serve.log}"

bentoml serve --host 127.0.0.1 --port "$port" > "$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
    kill -0 "$server" 2>/dev/null || { echo "error: bentoml serve exited; see $log" >&2; tail -5 "$log" >&2; exit 1; }
    sleep 0.5
done
curl -sf "http://127.0.0.1:$port/readyz" > /dev/null || { echo "error: not ready after 60 s; see $log" >&2; exit 1; }

request='{"x1": 3.0, "x2": 4.0}'
echo "\$ curl -s -X POST http://127.0.0.1:$port/predict -H 'Content-Type: application/json' -d '$request'"
curl -s -X POST "http://127.0.0.1:$port/predict" -H 'Content-Type: application/json' -d "$request"
echo
[ "${1:-}" = "--once" ] && exit 0
echo "serving on http://127.0.0.1:$port (Swagger UI at /, log in $log); Ctrl-C to stop"
wait "$server"
