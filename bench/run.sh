#!/usr/bin/env bash
# Runs the benchmarks with repetitions and prints the medians of every
# counter (baseline, hooked, added, added %), one line per benchmark.
#   bench/run.sh [BUILD_DIR] [extra Google Benchmark flags]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build}
shift || true
REPETITIONS=${REPETITIONS:-5}
out=$(mktemp --suffix=.json)
trap 'rm -f "$out"' EXIT
"$BUILD_DIR/bench/bench_native" --benchmark_repetitions="$REPETITIONS" --benchmark_report_aggregates_only=true \
  --benchmark_out="$out" --benchmark_out_format=json "$@" >/dev/null
python3 bench/summarize.py "$out"
