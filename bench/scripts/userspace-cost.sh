#!/usr/bin/env bash
# Small-request throughput through the gateway (user-space TLS path) vs. the
# backend alone, same client (wrk, keep-alive POSTs), same run, alternating
# rounds. A stopgap until `bench compare` lands; prints a ratio per round and
# the median.
#
# Usage: bench/scripts/userspace-cost.sh [ROUNDS] [SECONDS] [CONNECTIONS]
# Needs: wrk and nginx (installed from Debian when missing and run as root).
set -euo pipefail
rounds=${1:-3}; secs=${2:-5}; conns=${3:-32}
cd "$(dirname "$0")/../.."
for tool in wrk nginx; do
    if ! command -v "$tool" >/dev/null; then
        pkg=$tool; [ "$tool" = nginx ] && pkg=nginx-light
        echo "installing $pkg (apt-get)"; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
    fi
done
cargo build --release -q -p mcp-tls-gateway
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
bport=$((20000 + RANDOM % 10000)); gport=$((bport + 1))
cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work;
  server { listen 127.0.0.1:$bport reuseport backlog=4096; keepalive_requests 1000000;
    location / { default_type application/json;
      return 200 '{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo"}]}}'; } } }
CONF
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
wrk.headers["Content-Type"] = "application/json"
LUA
nginx -c "$work/nginx.conf" & 
./target/release/mcp-tls-gateway demo --exit-after 0s --port 0 --traffic-secs 1 --dir "$work" >/dev/null
./target/release/mcp-tls-gateway --listen 127.0.0.1:$gport --cert "$work/chain.pem" --key "$work/key.pem" \
    --backend 127.0.0.1:$bport --log-level warn 2>"$work/gw.log" &
sleep 1
rps() { wrk -t1 -c"$conns" -d"${secs}s" -s "$work/post.lua" "$1" | awk '/Requests\/sec/ {print $2}'; }
ratios=()
echo "round  backend-alone(req/s)  via-gateway(req/s)  ratio"
for r in $(seq 1 "$rounds"); do
    if ((r % 2)); then b=$(rps "http://127.0.0.1:$bport/mcp"); g=$(rps "https://127.0.0.1:$gport/mcp")
    else g=$(rps "https://127.0.0.1:$gport/mcp"); b=$(rps "http://127.0.0.1:$bport/mcp"); fi
    ratio=$(awk -v g="$g" -v b="$b" 'BEGIN { printf "%.3f", g / b }')
    ratios+=("$ratio")
    printf "%5d  %20s  %18s  %5s\n" "$r" "$b" "$g" "$ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print "median ratio gateway/backend-alone: " a[int((NR+1)/2)]}'
echo "(client wrk -t1 -c$conns, backend nginx 1 worker, gateway $(nproc) workers; all on $(nproc) cores)"
