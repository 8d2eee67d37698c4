#!/usr/bin/env bash
# Compile-checks storyfarm-diffusion with `--features cuda` on a machine without a GPU.
#
# nvcc and the CUDA headers come from PyPI wheels (scripts/cuda-toolchain.sh). Nothing is linked
# (libcuda is absent), so this proves the code and the CUDA kernels compile, not that they run;
# scripts/build-cuda.sh builds binaries that do. The check uses its own target folder so the
# normal CPU build is not invalidated. About 15 minutes cold on 2 cores.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
set +e
# shellcheck source=scripts/cuda-toolchain.sh
source "$repo_root/scripts/cuda-toolchain.sh"
rc=$?
set -e
[[ $rc -eq 0 ]] || exit $rc
nvcc --version | tail -n 2

cd "$repo_root"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}/cuda-check"
CARGO_TARGET_DIR="$target_dir" cargo check -p storyfarm-diffusion --features cuda --all-targets "$@"
echo "check-cuda: storyfarm-diffusion compiles with --features cuda"
