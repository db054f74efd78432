#!/usr/bin/env bash
# Old code against new over HTTP, side by side in one run: /classify throughput at saturation.
#
#   git worktree add ../old <commit>                 # the code to compare against
#   bash benchmarks/compare_http.sh ../old [pairs] [query] [seconds] [log-level]
#
# Starts the shipped model twice on loopback, once from the other tree (its code and its own
# models/mnist, which an older version may need) and once from this one, each without its gRPC endpoint, waits for both to settle, then runs `wrk` (32
# keep-alive connections posting examples/seven.png) against each in turn, the order alternating
# pair by pair (old-new, new-old, ...), so that a drift of the machine's speed hits both alike.
# Both run at the same --log-level (default info, as fpn-serve runs: one access line per request;
# warning leaves the access log out). Prints each pair and the median ratio new/old, and writes benchmarks/results/compare_http.json.
set -euo pipefail
old_tree=$(cd "${1:?usage: compare_http.sh OLD_TREE [pairs] [query] [seconds] [log-level]}" && pwd)
pairs=${2:-12}
query=${3:-/classify?tol=1e-3}
seconds=${4:-2}
log_level=${5:-info}
here=$(cd "$(dirname "$0")/.." && pwd)
command -v wrk >/dev/null || { echo "compare_http.sh: needs wrk (Debian package wrk)" >&2; exit 2; }

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat >"$work/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local f = io.open("$here/examples/seven.png", "rb")
wrk.body = f:read("*all")
f:close()
EOF
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
old_port=$(free_port)
new_port=$(free_port)
(cd "$old_tree" && FPN_SERVE_GRPC_PORT=0 PYTHONPATH="$old_tree" exec python -m fpn_serve.cli \
  "$old_tree/models/mnist" --port "$old_port" --log-level "$log_level") >"$work/old.log" 2>&1 &
(cd "$here" && FPN_SERVE_GRPC_PORT=0 exec python -m fpn_serve.cli \
  "$here/models/mnist" --port "$new_port" --log-level "$log_level") >"$work/new.log" 2>&1 &
for port in "$old_port" "$new_port"; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.3; done
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "a server did not start:" >&2; cat "$work"/*.log >&2; exit 1; }
done
sleep 10 # both settle (the new one measures its latency-target costs while idle)
rps() { wrk -t1 -c32 -d"${seconds}s" -s "$work/post.lua" "http://127.0.0.1:$1$query" | awk '/Requests\/sec/ {print $2}'; }
rps "$old_port" >/dev/null
rps "$new_port" >/dev/null
: >"$work/pairs"
for i in $(seq "$pairs"); do
  if [ $((i % 2)) = 1 ]; then o=$(rps "$old_port"); n=$(rps "$new_port"); else n=$(rps "$new_port"); o=$(rps "$old_port"); fi
  echo "$o $n" >>"$work/pairs"
done
python - "$work/pairs" "$old_tree" "$query" "$here/benchmarks/results/compare_http.json" "$log_level" <<'EOF'
import json, platform, statistics, subprocess, sys
rows = [tuple(map(float, line.split())) for line in open(sys.argv[1])]
ratios = [n / o for o, n in rows]
try:
    cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name"))
except (OSError, StopIteration):
    cpu = platform.processor()
print(f"{sys.argv[3]}, 32 connections, log level {sys.argv[5]}, {len(rows)} pairs, order alternating; {cpu}")
print(f"{'pair':>4} {'old req/s':>10} {'new req/s':>10} {'new/old':>8}")
for i, ((o, n), r) in enumerate(zip(rows, ratios), 1):
    print(f"{i:>4} {o:>10.0f} {n:>10.0f} {r:>8.3f}")
summary = {"median_old_rps": statistics.median(o for o, _ in rows), "median_new_rps": statistics.median(n for _, n in rows), "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
print(f"median ratio new/old {summary['median_ratio']:.3f} (from {summary['min_ratio']:.3f} to {summary['max_ratio']:.3f})")
json.dump({"query": sys.argv[3], "log_level": sys.argv[5], "cpu": cpu, "pairs": rows, **summary}, open(sys.argv[4], "w"), indent=1)
print(f"wrote {sys.argv[4]}")
EOF
