#!/usr/bin/env bash
# Two aecho processes sharing one Redis (the shared L2 store): starts a
# redis-server on 127.0.0.1 (a free port, no persistence, maxmemory with
# allkeys-lru), runs `aecho bench --store` once to fill it (process A), then
# again in a second process (B) that reads what A wrote, and prints, per
# process, echo mode's prefill time next to exact prefix reuse (which has no
# L2: the same-process baseline), where the reused K/V came from (L1/L2),
# the L2 hit rates and what the L2 lookups cost. Stops the server it started.
# Fails when process B reused nothing from L2.
#
# Usage: tools/bench_shared_store.sh [BUILD_DIR]     (default build/release)
# Environment: SCENARIO (chatbot), REQUESTS (16), CONTEXT (the model's, at
# most 4096), DEADLINE_MS (100) and WRITE_TIMEOUT_MS (1000): a 2,000-token
# prompt of the bundled model is 32 MB of K/V, which the defaults (3 ms,
# 50 ms) cannot move; OUT (a directory for the JSON, the text reports and
# the server's log; default a temp dir).
# Short form (CI): REQUESTS=4 CONTEXT=256 tools/bench_shared_store.sh
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
aecho="$build/aecho"
[ -x "$aecho" ] || { echo "bench_shared_store: $aecho not built" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "bench_shared_store: redis-server not installed (tools/setup.sh)" >&2; exit 1; }
scenario=${SCENARIO:-chatbot}
requests=${REQUESTS:-16}
deadline=${DEADLINE_MS:-100}
write_timeout=${WRITE_TIMEOUT_MS:-1000}
out=${OUT:-$(mktemp -d /tmp/ae_shared_store.XXXXXX)}
mkdir -p "$out"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$out" \
  --maxmemory 1gb --maxmemory-policy allkeys-lru --loglevel warning --logfile "$out/redis.log" &
redis_pid=$!
trap 'kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.05
done
redis-cli -p "$port" ping >/dev/null

url="redis://127.0.0.1:$port?deadline_ms=$deadline&write_timeout_ms=$write_timeout"
args=(bench --scenario "$scenario" --requests "$requests" --store "$url")
[ -n "${CONTEXT:-}" ] && args+=(--context "$CONTEXT")
echo "shared store: redis-server on 127.0.0.1:$port, aecho ${args[*]}"
for process in A B; do
  "$aecho" "${args[@]}" --json "$out/$process.json" >"$out/$process.txt" 2>/dev/null
done

python3 - "$out/A.json" "$out/B.json" <<'EOF'
import json, sys
print(f"{'':4} {'scenario':12} {'exact-prefix ms':>15} {'echo ms':>8} {'echo/exact':>10} {'L1 rows':>8} {'L2 rows':>8}"
      f" {'L2 block hits':>13} {'L2 ms/req':>9} {'L2 max ms':>9} {'L2 share':>8}")
for name, path in zip("AB", sys.argv[1:]):
    for s in json.load(open(path))["scenarios"]:
        exact, echo, l2 = s["modes"]["exact-prefix"], s["modes"]["echo"], s["shared_store"]
        print(f"{name:4} {s['scenario']:12} {exact['prefill_ms_mean']:15.1f} {echo['prefill_ms_mean']:8.1f}"
              f" {exact['prefill_ms_mean'] / echo['prefill_ms_mean']:9.2f}x {100 * l2['l1_reused_fraction']:7.1f}%"
              f" {100 * l2['l2_reused_fraction']:7.1f}% {100 * l2['kv_blocks']['hit_rate']:12.1f}%"
              f" {l2['l2_lookup_ms_per_request']:9.2f} {l2['kv_blocks']['max_lookup_ms']:9.2f}"
              f" {100 * l2['l2_lookup_share_of_prefill']:7.1f}%")
        if name == "B" and l2["l2_reused_fraction"] == 0:
            sys.exit(f"bench_shared_store: process B reused nothing from L2 in {s['scenario']}")
EOF
echo "JSON, text reports and the server's log: $out"
