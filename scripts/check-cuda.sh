#!/usr/bin/env bash
# Compile-checks storyfarm-diffusion with `--features cuda` on a machine without a GPU.
#
# nvcc and the CUDA headers come from PyPI wheels in a cached venv. CUDA 13.4 is pinned because
# cudarc accepts CUDA only up to 13.4. Nothing is linked (libcuda is absent), so this proves the
# code and the CUDA kernels compile, not that they run. The check uses its own target folder so
# the normal CPU build is not invalidated. About 15 minutes cold on 2 cores.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${STORYFARM_CACHE:-$HOME/.cache/storyfarm}"
venv="$cache_root/cuda-venv"
cuda_series="13.4"

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
# The marker records what was installed, so a venv from an earlier (or interrupted) run is redone.
marker="$venv/.storyfarm-cuda-$cuda_series"
if [[ ! -f "$marker" ]]; then
  # Exit 3 tells callers the toolchain could not be installed (registry unreachable), as
  # opposed to the code failing to compile.
  "$venv/bin/python" -m pip install --quiet \
    "nvidia-cuda-nvcc==$cuda_series.*" \
    "nvidia-cuda-crt==$cuda_series.*" \
    "nvidia-nvvm==$cuda_series.*" \
    "nvidia-cuda-runtime==$cuda_series.*" \
    nvidia-cuda-cccl || exit 3
  touch "$marker"
fi

cuda_home="$(find "$venv" -type d -path '*/site-packages/nvidia/cu13' -print -quit)"
if [[ -z "$cuda_home" || ! -x "$cuda_home/bin/nvcc" ]]; then
  echo "check-cuda: no nvcc under $venv (expected .../site-packages/nvidia/cu13/bin/nvcc)" >&2
  exit 1
fi

export PATH="$cuda_home/bin:$PATH"
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
# Any compute capability works for a compile check; 80 (A100) is the oldest the kernels target.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
nvcc --version | tail -n 2

cd "$repo_root"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}/cuda-check"
CARGO_TARGET_DIR="$target_dir" cargo check -p storyfarm-diffusion --features cuda --all-targets "$@"
echo "check-cuda: storyfarm-diffusion compiles with --features cuda"
