#!/usr/bin/env bash
# Builds GPU binaries (`--features cuda`) on a machine without a GPU or driver, to run on one that
# has them: the golden harness, the UNet bench and the `storyfarm` CLI.
#
#   scripts/build-cuda.sh [OUT_DIR]     (default: gpu-bin/, ignored by git)
#
# The CUDA libraries come from PyPI wheels (scripts/cuda-toolchain.sh). The driver library
# (libcuda.so.1) ships only with a driver, so it is linked against a stub generated from the
# driver API cudarc binds, the way CUDA's own lib64/stubs/libcuda.so is used; the real one is
# loaded at run time. On the GPU machine the binaries need libcublas, libcublasLt, libcurand,
# libnvrtc and libcudart of CUDA 13 on LD_LIBRARY_PATH (scripts/gpu-check finds them).
# Its own target folder, so the normal CPU build is not invalidated; about 30 minutes cold on
# 2 cores (candle's kernels through nvcc, then candle and the workspace).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$repo_root/gpu-bin}"
set +e
# shellcheck source=scripts/cuda-toolchain.sh
source "$repo_root/scripts/cuda-toolchain.sh"
rc=$?
set -e
[[ $rc -eq 0 ]] || exit $rc
nvcc --version | tail -n 2

cd "$repo_root"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}/cuda-build"
link_dir="$target_dir/cuda-link"
mkdir -p "$link_dir"

# The stub exports every driver entry point cudarc declares; each returns
# CUDA_ERROR_STUB_LIBRARY (34) in case the stub itself is ever loaded.
cudarc_src="$(cargo metadata --format-version 1 --locked --features storyfarm-diffusion/cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')"
grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc_src/src/driver/sys/mod.rs" |
  awk '{print $4}' | sort -u |
  awk '{printf "int %s(void) { return 34; }\n", $1}' >"$link_dir/libcuda-stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link_dir/libcuda.so" "$link_dir/libcuda-stub.c"
for lib in cudart cublas cublasLt curand nvrtc; do
  real="$(ls "$cuda_lib"/lib$lib.so.* | grep -v alt | head -n 1)"
  ln -sf "$real" "$link_dir/lib$lib.so"
done

export CARGO_TARGET_DIR="$target_dir"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link_dir"
# No debug info: the binaries travel to the GPU machine, and size counts there.
export CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_DEV_STRIP=debuginfo

cargo build -p storyfarm-diffusion --features cuda --example bench_unet
golden="$(cargo test -p storyfarm-diffusion --features cuda --test golden --no-run --message-format json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "golden" and m.get("executable"):
        print(m["executable"])')"
cargo build -p storyfarm --features cuda

mkdir -p "$out_dir"
cp "$target_dir/debug/examples/bench_unet" "$out_dir/bench_unet"
cp "$golden" "$out_dir/golden"
cp "$target_dir/debug/storyfarm" "$out_dir/storyfarm"
strip "$out_dir"/*
# One archive to carry to the GPU machine (about 30 MB against 190 MB unpacked);
# scripts/gpu-check unpacks it.
tar -C "$(dirname "$out_dir")" -cf - "$(basename "$out_dir")" | xz -T0 -6 >"$out_dir.tar.xz"
ls -la "$out_dir" "$out_dir.tar.xz"
echo "build-cuda: GPU binaries in $out_dir and $out_dir.tar.xz"
