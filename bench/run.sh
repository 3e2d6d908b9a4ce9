#!/usr/bin/env bash
# Runs every benchmark with repetitions and prints the medians of its counters
# (baseline, variant, added, added %), one line per benchmark.
#   bench/run.sh [BUILD_DIR] [extra Google Benchmark flags, e.g. --benchmark_filter=chain]
# REPETITIONS (default 5) sets the repetitions. The TorchScript models are
# exported once into BUILD_DIR/bench/models by Debian's python3-torch.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build}
shift || true
REPETITIONS=${REPETITIONS:-5}
export FLEXMODEL_BENCH_MODELS="$BUILD_DIR/bench/models"
if [[ ! -f "$FLEXMODEL_BENCH_MODELS/chain_scripted.pt" || ! -f "$FLEXMODEL_BENCH_MODELS/gpt_narrow_scripted.pt" ]]; then
  /usr/bin/python3 tests/fixtures/make_fixtures.py "$FLEXMODEL_BENCH_MODELS" --gpt2-small --chain
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for program in bench_native bench_torchscript; do
  "$BUILD_DIR/bench/$program" --benchmark_repetitions="$REPETITIONS" --benchmark_report_aggregates_only=true \
    --benchmark_out="$out/$program.json" --benchmark_out_format=json "$@" >/dev/null 2>"$out/$program.log" \
    || { cat "$out/$program.log" >&2; exit 1; }
done
python3 bench/summarize.py "$out"/*.json
