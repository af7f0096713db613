#!/usr/bin/env bash
# A/B of two versions of the kernel sources on one GPU machine, in one device call: timings
# compare only within a machine (docs/kernel_notes.md), and a fresh machine per call would make
# two calls two machines.
#
#   here:       bash experiments/cuda_device_ab.sh prepare [REF]    # base = xla_ffi/ at REF (main)
#   on the GPU: OUT=... [NEW_STEPS="test sanitize"] [PYTEST_K=...] [AB_BENCH_ARGS=--quick] \
#                 bash experiments/cuda_device_ab.sh run             # the run tool: carry runs/ab
#
# `run` builds the base sources and runs the benchmark (`cuda_device_run.sh bench` with
# AB_BENCH_ARGS: --no-reference by default; --quick, D = 1 alone, leaves the call room for
# tests), then builds the working tree's, runs NEW_STEPS and the benchmark, and prints
# experiments/compare_bench.py's table of the two (also written to $OUT/compare.md). Logs:
# $OUT/base.log, $OUT/new.log; results under $OUT/base and $OUT/new.
set -u
case ${1:-} in
  prepare)
    ref=${2:-main}
    rm -rf runs/ab/base && mkdir -p runs/ab/base
    for f in $(git ls-tree --name-only "$ref" xla_ffi/); do
      git show "$ref:$f" >"runs/ab/base/$(basename "$f")" || exit 1
    done
    echo "runs/ab/base: xla_ffi/ of $ref ($(git rev-parse --short "$ref"))" ;;
  run)
    if [ ! -d runs/ab/base ]; then
      echo "runs/ab/base missing: run 'prepare' on the machine with the repository, carry runs/ab"
      exit 1
    fi
    OUT=${OUT:-runs/device}
    mkdir -p "$OUT"
    rm -rf /tmp/ab_new && cp -r xla_ffi /tmp/ab_new
    rm -rf xla_ffi && mkdir xla_ffi && cp runs/ab/base/* xla_ffi/ && rm -rf build
    OUT=$OUT/base BENCH_ARGS=${AB_BENCH_ARGS:---no-reference} \
      bash experiments/cuda_device_run.sh bench \
      >"$OUT/base.log" 2>&1
    echo "base: $(grep 'build:' "$OUT/base.log")"
    rm -rf xla_ffi && cp -r /tmp/ab_new xla_ffi && rm -rf build
    # shellcheck disable=SC2086  # NEW_STEPS is a list of steps
    OUT=$OUT/new BENCH_ARGS=${AB_BENCH_ARGS:---no-reference} \
      bash experiments/cuda_device_run.sh ${NEW_STEPS:-} bench >"$OUT/new.log" 2>&1
    grep -E "build:|passed|failed|SUMMARY" "$OUT/new.log" | tail -6
    python3 experiments/compare_bench.py "$OUT/base/bench/bench_kernel.json" \
      "$OUT/new/bench/bench_kernel.json" | tee "$OUT/compare.md" ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
