#!/usr/bin/env bash
# Distributed benchmarks: MPI gather/all-gather against raw MPI of the same
# bytes, and a hooked forward on (2,2,2) against (1,1,1).
#   bench/run_dist.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build}
MPIRUN=(mpirun --oversubscribe --allow-run-as-root --mca btl self,vader --mca btl_vader_single_copy_mechanism none)
for np in 2 4; do
  for bytes in 1048576 16777216; do
    "${MPIRUN[@]}" -np "$np" "$BUILD_DIR/bench/bench_dist" gather "$bytes"
  done
done
single=$("${MPIRUN[@]}" -np 1 "$BUILD_DIR/bench/bench_dist" forward 1 1 1)
mesh=$("${MPIRUN[@]}" -np 8 "$BUILD_DIR/bench/bench_dist" forward 2 2 2)
echo "$single"
echo "$mesh"
python3 - "$single" "$mesh" <<'PY'
import sys
ms = [float(line.split("median_ms=")[1]) for line in sys.argv[1:]]
print(f"forward (2,2,2) / (1,1,1) = {ms[1] / ms[0]:.2f}x on this machine's cores")
PY
