#!/usr/bin/env bash
# Run every benchmark of bench/ one after another, from the repository root, each with its defaults.
# Each prints its tables and a final "KEY <bench> name=value ..." line; this script repeats the KEY lines
# at the end and lists any process of ours left behind. Output of each goes to $BENCH_LOGS (default: a
# temporary directory). Usage: bench/run_all.sh [bench names...]   e.g. bench/run_all.sh join_time
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOGS=${BENCH_LOGS:-$(mktemp -d -t hivemind-bench-logs-XXXXXX)}
mkdir -p "$LOGS"
BENCHES=("$@")
[ ${#BENCHES[@]} -eq 0 ] && BENCHES=(served_vs_local client_vs_hivemind idle_cpu join_time trainer_dispatch swarm_scaling dashboard_cost audit_overhead)

echo "$(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1 /proc/loadavg); logs in $LOGS"
failed=0
for bench in "${BENCHES[@]}"; do
    echo "=== $bench"
    start=$(date +%s)
    timeout 600 "$PY" -m "bench.$bench" 2>"$LOGS/$bench.err" | tee "$LOGS/$bench.out"
    rc=${PIPESTATUS[0]}
    echo "=== $bench: exit $rc in $(( $(date +%s) - start )) s"
    if [ "$rc" -ne 0 ]; then
        failed=1
        tail -20 "$LOGS/$bench.err"
    fi
done

echo
echo "=== key figures"
grep -h '^KEY ' "$LOGS"/*.out
left=$(ps -eo pid,args | grep -E 'hivemind-bench-|bench\.plain_server' | grep -v -E 'grep|run_all' || true)
if [ -n "$left" ]; then
    echo "=== leftover processes of the benchmarks:"
    echo "$left"
    failed=1
fi
exit $failed
