#!/usr/bin/env bash
# Sets up a Debian 12 machine for flexmodel, builds it, and runs a job.
#   tools/setup.sh run    install, build, run the main job on the bundled default
#   tools/setup.sh test   install, build, run the whole test suite (ctest)
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
  libhdf5-dev
  libspdlog-dev libcli11-dev nlohmann-json3-dev
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  python3-torch python3-h5py python3-numpy
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

case "${1:-}" in
  deps)
    install_dependencies
    ;;
  run)
    install_dependencies
    build
    "$BUILD_DIR/examples/gpt_hooks"
    ;;
  test)
    install_dependencies
    build
    ctest --test-dir "$BUILD_DIR" --output-on-failure
    ;;
  *)
    echo "usage: tools/setup.sh run|test|deps" >&2
    exit 2
    ;;
esac
