# Sourced by scripts/check-cuda.sh and scripts/build-cuda.sh: a CUDA toolchain from PyPI wheels
# in a cached venv, for machines without a CUDA install (like the development and CI machines).
#
# CUDA 13.0 is pinned to match the driver of the GPU machines we run on (driver 580 = CUDA 13.0):
# candle's kernels ship as PTX, and a driver refuses PTX from a newer nvcc than its own CUDA
# version. cudarc accepts 13.0 through 13.4.
#
# Sets PATH, CUDA_HOME/CUDA_PATH/CUDA_ROOT and CUDA_COMPUTE_CAP; `cuda_lib` is the folder holding
# libcudart, libcublas(Lt), libcurand and libnvrtc. Returns 3 when the wheels cannot be installed
# (registry unreachable), so callers can tell that apart from code that does not compile.

cuda_series="13.0"
cache_root="${STORYFARM_CACHE:-$HOME/.cache/storyfarm}"
cuda_venv="$cache_root/cuda-venv"

if [[ ! -x "$cuda_venv/bin/python" ]]; then
  python3 -m venv "$cuda_venv"
fi
# The marker records what was installed, so a venv from an earlier (or interrupted) run is redone.
cuda_marker="$cuda_venv/.storyfarm-cuda-$cuda_series-libs"
if [[ ! -f "$cuda_marker" ]]; then
  "$cuda_venv/bin/python" -m pip install --quiet \
    "nvidia-cuda-nvcc==$cuda_series.*" \
    "nvidia-cuda-crt==$cuda_series.*" \
    "nvidia-nvvm==$cuda_series.*" \
    "nvidia-cuda-runtime==$cuda_series.*" \
    "nvidia-cuda-cccl==$cuda_series.*" \
    "nvidia-cuda-nvrtc==$cuda_series.*" \
    "nvidia-cublas==$cuda_series.*" \
    "nvidia-curand" || return 3
  rm -f "$cuda_venv"/.storyfarm-cuda-*
  touch "$cuda_marker"
fi

cuda_home="$(find "$cuda_venv" -type d -path '*/site-packages/nvidia/cu13' -print -quit)"
if [[ -z "$cuda_home" || ! -x "$cuda_home/bin/nvcc" ]]; then
  echo "cuda-toolchain: no nvcc under $cuda_venv (expected .../site-packages/nvidia/cu13/bin/nvcc)" >&2
  return 1
fi
cuda_lib="$cuda_home/lib"

export PATH="$cuda_home/bin:$PATH"
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
# 90 = Hopper (H100/H200), the GPUs we run on; override for others (80 is the oldest candle's
# kernels target).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
