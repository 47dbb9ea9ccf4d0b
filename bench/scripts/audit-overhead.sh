#!/usr/bin/env bash
# Small-request throughput of the same gateway build with auditing + admin
# API (metrics scraped every second) ON vs OFF, same machine, same run,
# alternating rounds so drift hits both alike.
#
#   bash bench/scripts/audit-overhead.sh [ROUNDS] [SECONDS]
#
# Prints per-round requests/s and the median ratio on/off, for keep-alive
# small requests (loadgen rr) and for one connection per request (loadgen
# handshake: one audit record per request).
set -euo pipefail
ROUNDS=${1:-5}
SECS=${2:-5}
cd "$(dirname "$0")/../.."
cargo build --release -q -p mcp-tls-gateway -p loadgen
GW=target/release/mcp-tls-gateway
LG=target/release/loadgen
W=$(mktemp -d /tmp/audit-overhead.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# A root CA and a leaf for localhost (clients reject a self-signed leaf).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-root -keyout "$W/ca.key" -out "$W/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$W/key.pem" -out "$W/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$W/ext"
openssl x509 -req -in "$W/leaf.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
  -days 2 -extfile "$W/ext" -out "$W/cert.pem" 2>/dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BP=$(port); PON=$(port); POFF=$(port); PADM=$(port)
"$LG" backend --listen 127.0.0.1:$BP >"$W/backend.log" 2>&1 & pids+=($!)
common() {
  cat <<TOML
[server]
workers = 1
[[listener]]
listen = "127.0.0.1:$1"
cert = "$W/cert.pem"
key = "$W/key.pem"
backend = "127.0.0.1:$BP"
TOML
}
{ common $PON; cat <<TOML
[audit]
path = "$W/audit.jsonl"
[admin]
listen = "127.0.0.1:$PADM"
TOML
} >"$W/on.toml"
common $POFF >"$W/off.toml"
"$GW" --config "$W/on.toml" >"$W/on.log" 2>&1 & pids+=($!)
"$GW" --config "$W/off.toml" >"$W/off.log" 2>&1 & pids+=($!)
sleep 1
( while true; do curl -s -o /dev/null http://127.0.0.1:$PADM/metrics; sleep 1; done ) & pids+=($!)

run() { # mode port
  local extra=()
  [ "$1" = rr ] && extra=(-c 32)
  [ "$1" = handshake ] && extra=(-c 8)
  "$LG" "$1" "https://127.0.0.1:$2/mcp" --ca "$W/ca.pem" -t 1 -d "${SECS}s" --warmup 1s -q \
     "${extra[@]}" --json - 2>/dev/null | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["requests_per_s"]))'
}
for mode in rr handshake; do
  on=(); off=()
  for r in $(seq 1 "$ROUNDS"); do
    if (( r % 2 )); then a=$(run $mode $PON); b=$(run $mode $POFF); else b=$(run $mode $POFF); a=$(run $mode $PON); fi
    on+=("$a"); off+=("$b")
    echo "$mode round $r: on=$a off=$b req/s"
  done
  python3 - "$mode" "${on[*]}" "${off[*]}" <<'PY'
import statistics, sys
mode, on, off = sys.argv[1], list(map(float, sys.argv[2].split())), list(map(float, sys.argv[3].split()))
mo, mf = statistics.median(on), statistics.median(off)
ratios = [a / b for a, b in zip(on, off)]
print(f"{mode}: median on={mo:.0f} off={mf:.0f} req/s  ratio on/off={mo/mf:.3f}  per-round ratios={' '.join(f'{r:.3f}' for r in ratios)}")
PY
done
echo "audit records written: $(wc -l < "$W/audit.jsonl")"
