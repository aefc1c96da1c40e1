#!/usr/bin/env bash
# Build and run the native benchmark: bench/run_native.sh [fastdropout_bench options]
# e.g. bench/run_native.sh --quick --json bench/out/native.json   (--help lists the options)
# A relative --json path is taken from the directory the script is run from.
set -euo pipefail
args=()
while (($#)); do
  if [[ $1 == --json && $# -ge 2 ]]; then
    path=$2
    [[ $path == /* ]] || path="$PWD/$path"
    args+=(--json "$path")
    shift 2
  else
    args+=("$1")
    shift
  fi
done
cd "$(dirname "$0")/.."
cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DFASTDROPOUT_BUILD_BENCH=ON \
  -DFASTDROPOUT_BUILD_PYTHON=OFF > /dev/null
cmake --build build/bench -j 2 > /dev/null
mkdir -p bench/out
exec build/bench/fastdropout_bench ${args[@]+"${args[@]}"}
