#!/usr/bin/env bash
# The Python client's figures for BENCHMARKS.md, in one sitting:
#
# 1. the example app under gunicorn in front of one scaled daemon, and the same app on the original
#    design (the Python baseline's seed_manager.py with a redis-server), each driven by the example load
#    script at 100 and 1000 users, ROUNDS times, interleaved;
# 2. the client's own cost per call (sync and asyncio) next to a bare redis-py GET.
#
# Run from anywhere, after scripts/test-python (which makes the venv) and `cargo build --release`:
#   python/benchmarks/figures.sh            # ROUNDS=3 MESSAGES=20 WORKERS=4 THREADS=16 by default
# Needs redis-server and redis-py (`pip install './python[bench]'` into the venv). Everything it starts
# listens on this machine only and is stopped at the end. Results go to target/python-bench/.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${PYTHON_VENV:-target/python-venv}
PY=$(cd "$VENV/bin" && pwd)/python
BASELINE_DIR=${BASELINE_DIR:-$(cd .. && pwd)/shared/baseline}
ROUNDS=${ROUNDS:-3}
MESSAGES=${MESSAGES:-20}
WORKERS=${WORKERS:-4}
THREADS=${THREADS:-16}
OUT=target/python-bench
mkdir -p "$OUT"
: > "$OUT/runs.jsonl"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

SOCK=$(mktemp -u /tmp/scaled-bench-XXXXXX.sock)
env -u REDIS_URL target/release/scaled --socket "$SOCK" --log warn &
pids+=($!)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >/dev/null &
pids+=($!)

serve() {  # serve BACKEND PORT: the example app under gunicorn
  env SCALED_SOCKET="$SOCK" EXAMPLE_BACKEND="$1" REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
    ORIGINAL_MANAGER_DIR="$BASELINE_DIR" \
    "$PY" -m gunicorn --chdir python/examples -w "$WORKERS" -k gthread --threads "$THREADS" \
    -b "127.0.0.1:$2" --log-level warning app:app &
  pids+=($!)
}
SCALED_PORT=$(free_port)
ORIGINAL_PORT=$(free_port)
serve scaled "$SCALED_PORT"
serve original "$ORIGINAL_PORT"
for port in "$SCALED_PORT" "$ORIGINAL_PORT"; do
  for _ in $(seq 200); do
    "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/api/stats', timeout=2)" \
      2>/dev/null && break
    sleep 0.1
  done
done

run() {  # run BACKEND PORT USERS
  echo "== $1, $3 users × $MESSAGES messages" >&2
  "$PY" python/examples/loadtest.py --url "http://127.0.0.1:$2" --users "$3" --messages "$MESSAGES" \
    --label "$1 $3" | tee -a "$OUT/runs.jsonl" | cut -c1-240 >&2 || true
}
for round in $(seq "$ROUNDS"); do
  for users in 100 1000; do
    if ((round % 2)); then
      run scaled "$SCALED_PORT" "$users"; run original "$ORIGINAL_PORT" "$users"
    else
      run original "$ORIGINAL_PORT" "$users"; run scaled "$SCALED_PORT" "$users"
    fi
  done
done

echo "== per-call overhead" >&2
"$PY" python/benchmarks/overhead.py --socket "$SOCK" --redis-port "$REDIS_PORT" --calls 20000 --rounds 5 \
  | tee "$OUT/overhead.jsonl" >&2
"$PY" python/benchmarks/summarize.py "$OUT/runs.jsonl" "$OUT/overhead.jsonl" | tee "$OUT/summary.md"
