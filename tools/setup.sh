#!/usr/bin/env bash
# Sets up a Debian 12 machine for flexmodel, builds it, and runs a job.
#   tools/setup.sh run    install, build, run the main job on the bundled default:
#                         flex-dump of the bundled GPT's activations to build/acts.h5,
#                         read back with h5py, then the induction-heads study
#                         (build/induction: scores table, picture)
#   tools/setup.sh test   install, build, run the whole test suite (ctest), then
#                         the unit, writer and fuzz tests under ASan+UBSan and TSan
#   tools/setup.sh deps   install the dependencies only
# Idempotent: packages already present are not fetched again. BUILD_DIR picks
# the build folder (default: build).
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libopenblas0-pthread
  libopenmpi-dev openmpi-bin
  libhdf5-dev zlib1g-dev hdf5-filter-plugin hdf5-filter-plugin-blosc-serial
  libspdlog-dev libcli11-dev nlohmann-json3-dev
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  python3-torch python3-h5py python3-numpy python3-matplotlib
)

install_dependencies() {
  local missing=()
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if ((${#missing[@]} == 0)); then
    echo "setup: all ${#PACKAGES[@]} Debian packages are present"
  else
    echo "setup: installing ${missing[*]}"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  # Debian's LibTorch runs matrix products on the reference BLAS unless OpenBLAS is the alternative.
  local blas
  blas=$(update-alternatives --query libblas.so.3-x86_64-linux-gnu 2>/dev/null | awk '/^Value:/ {print $2}')
  case "$blas" in
    *openblas*) ;;
    *) echo "setup: warning: libblas.so.3 points to '${blas:-nothing}', not OpenBLAS; matrix products will be slow" >&2 ;;
  esac
}

build() {
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
  cmake --build "$BUILD_DIR" -j "$(nproc)"
}

# The unit, writer and fuzz tests again under AddressSanitizer with
# UndefinedBehaviorSanitizer, and the writer's (threads) under
# ThreadSanitizer, each in a build folder of its own. LibTorch itself is not
# instrumented; it runs one thread, so that ThreadSanitizer sees every
# handover between the program and the writer thread in flexmodel's code. The
# kill sweeps stay out: a child with a preloaded library cannot run ASan.
sanitized_tests() {
  local asan="$BUILD_DIR-asan" tsan="$BUILD_DIR-tsan"
  local configure=(-G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1"
                   -DFLEXMODEL_BUILD_TOOLS=OFF -DFLEXMODEL_BUILD_EXAMPLES=OFF -DFLEXMODEL_BUILD_BENCHMARKS=OFF)
  local writer_tests="-*Sigkill*"
  cmake -S . -B "$asan" "${configure[@]}" -DFLEXMODEL_SANITIZE=address,undefined
  cmake --build "$asan" -j "$(nproc)" --target flexmodel_tests flexmodel_hdf5_tests fuzz_inputs
  # A small quarantine: the fuzz target bounds its peak memory, which a 256 MiB one would pass.
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:quarantine_size_mb=32
  export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 OMP_NUM_THREADS=1
  "$asan/tests/flexmodel_tests"
  "$asan/tests/flexmodel_hdf5_tests" --gtest_filter="$writer_tests"
  "$asan/tests/fuzz_inputs" tests/fuzz/corpus 20000 1
  cmake -S . -B "$tsan" "${configure[@]}" -DFLEXMODEL_SANITIZE=thread
  cmake --build "$tsan" -j "$(nproc)" --target flexmodel_hdf5_tests
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 "$tsan/tests/flexmodel_hdf5_tests" --gtest_filter="$writer_tests"
}

case "${1:-}" in
  deps)
    install_dependencies
    ;;
  run)
    install_dependencies
    build
    fixtures="$BUILD_DIR/tests/fixtures"
    "$BUILD_DIR/tools/flex-dump" --model "$fixtures/gpt_scripted.pt" --input "$fixtures/tokens.npy" \
      --hooks "layers.*.mlp,embed_tokens" --pre-hooks "lm_head" --out "$BUILD_DIR/acts.h5" --batch-size 1 --overwrite
    /usr/bin/python3 -c "import h5py; f = h5py.File('$BUILD_DIR/acts.h5', 'r'); \
print({name: f['activations'][name][kind].shape for name in f['activations'] for kind in f['activations'][name]})"
    "$BUILD_DIR/examples/induction_heads" "$BUILD_DIR/induction"
    ;;
  test)
    install_dependencies
    build
    ctest --test-dir "$BUILD_DIR" --output-on-failure
    sanitized_tests
    ;;
  *)
    echo "usage: tools/setup.sh run|test|deps" >&2
    exit 2
    ;;
esac
