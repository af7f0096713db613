#!/usr/bin/env bash
# A/B of two versions of the kernel sources on one GPU machine, in one device call: timings
# compare only within a machine (docs/kernel_notes.md), and a fresh machine per call would make
# two calls two machines.
#
#   here:       bash experiments/cuda_device_ab.sh prepare [REF]    # base = xla_ffi/ at REF (main)
#   on the GPU: OUT=... [NEW_STEPS="test sanitize"] [BASE_STEPS=chunk] [PYTEST_K=...] \
#                 [AB_BENCH_ARGS=--quick] \
#                 bash experiments/cuda_device_ab.sh run             # the run tool: carry runs/ab
#
# `run` builds the base sources and runs BASE_STEPS (e.g. a timing step such as `chunk`) and the
# benchmark on them (`cuda_device_run.sh bench` with AB_BENCH_ARGS: --no-reference by default;
# --quick, D = 1 alone, or --dtypes / --directions leave the call room for tests), then builds
# the working tree's and runs NEW_STEPS and the benchmark on it (both builds at once unless
# AB_PARALLEL=0, below), and prints
# experiments/compare_bench.py's table of the two (also written to $OUT/compare.md). Logs
# ($OUT/base.log, $OUT/new.log) and results ($OUT/base, $OUT/new) then go into
# $OUT/results.tar.gz (experiments/device_pack.sh), the markdown tables beside it.
set -u
source "$(dirname "$0")/device_pack.sh"
BASE_TREE=/tmp/ab_base_tree

# Both versions built at once (the default; AB_PARALLEL=0 builds them in turn in this tree),
# each in its own tree and its own virtual environment: nvcc compiles the kernels' one
# translation unit on about one core, so the two builds take about the time of one. On the H200
# machine both at once took 95 s, where each alone takes ~100-110 s (2026-11-29, five A/B runs).
# - The machine's python3 is itself a virtual environment (/opt/torch/.venv), whose packages a
#   new environment's --system-site-packages would not see: its site-packages go into each new
#   one as plain path lines (a .pth), which do not run the .pth files found there.
# - An editable install in the machine's own Python (an earlier call's `cuda_device_run.sh` on
#   a machine still held) would run an import hook there; it is removed first.
# - Each environment must then import its own tree's build, with the CUDA kernel, and see a GPU
#   where there is one.
# Returns 1 where that cannot be arranged (the caller builds in turn), 2 where a build fails (a
# second try would too).
parallel_builds() {
  local out=$1 side tree v outer
  python3 -m pip uninstall -y -q cgspn_jax >/dev/null 2>&1
  rm -rf "$BASE_TREE" && mkdir -p "$BASE_TREE" || return 1
  (set -o pipefail
   tar --exclude=./build --exclude=./runs --exclude=./.git -cf - . | tar -xf - -C "$BASE_TREE") \
    || return 1
  rm -rf "$BASE_TREE/xla_ffi" && mkdir "$BASE_TREE/xla_ffi" && cp runs/ab/base/* "$BASE_TREE/xla_ffi/" \
    || return 1
  outer=$(python3 -c 'import site; print("\n".join(site.getsitepackages()))') || return 1
  for side in base new; do
    v=/tmp/ab_venv_$side
    rm -rf "$v"
    python3 -m venv --without-pip "$v" || return 1
    echo "$outer" >"$("$v/bin/python3" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_ab_outer.pth"
    "$v/bin/python3" -c "import pip, scikit_build_core, nanobind, jax" 2>"$out/venv_$side.log" \
      || { echo "the $side environment lacks a package: $(tail -1 "$out/venv_$side.log")"; return 1; }
  done
  local t0 rb rn; t0=$(date +%s)
  (cd "$BASE_TREE" && /tmp/ab_venv_base/bin/python3 -m pip install --no-build-isolation --no-deps \
    -e . >"$out/base_build.log" 2>&1) &
  local pid_base=$!
  /tmp/ab_venv_new/bin/python3 -m pip install --no-build-isolation --no-deps -e . \
    >"$out/new_build.log" 2>&1 &
  local pid_new=$!
  wait $pid_base; rb=$?
  wait $pid_new; rn=$?
  [ $rb -ne 0 ] && tail -20 "$out/base_build.log"
  [ $rn -ne 0 ] && tail -20 "$out/new_build.log"
  [ $rb -ne 0 ] || [ $rn -ne 0 ] && return 2
  echo "both builds at once: $(( $(date +%s) - t0 )) s"
  local gpu=0; command -v nvidia-smi >/dev/null && gpu=1
  for side in base new; do
    tree=$(pwd -P); [ $side = base ] && tree=$(cd "$BASE_TREE" && pwd -P)
    (cd /tmp && "/tmp/ab_venv_$side/bin/python3" - "$tree" $gpu <<'PY'
import os, sys
import jax, cgspn_jax
here = os.path.realpath(cgspn_jax.__file__)
ok = here.startswith(os.path.realpath(sys.argv[1]) + os.sep) and cgspn_jax.build_info()["cuda_kernel"]
sys.exit(not ok or (sys.argv[2] == "1" and jax.devices()[0].platform != "gpu"))
PY
    ) || { echo "the $side environment does not run $tree's build on the GPU"; return 1; }
  done
}

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
    mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the base runs in another tree
    bench_args=${AB_BENCH_ARGS:---no-reference}
    built=1
    if [ "${AB_PARALLEL:-1}" != 0 ]; then parallel_builds "$OUT"; built=$?; fi
    [ $built = 2 ] && exit 1
    # Where each side runs: its own tree and environment (both built above), or this tree with
    # the base sources swapped in and the machine's python3, each built in turn by the bench
    # step (AB_PARALLEL=0, or where the environments could not be arranged).
    if [ $built = 0 ]; then
      base_dir=$BASE_TREE base_path=/tmp/ab_venv_base/bin:$PATH new_path=/tmp/ab_venv_new/bin:$PATH
    else
      base_dir=$PWD base_path=$PATH new_path=$PATH
      rm -rf /tmp/ab_new && cp -r xla_ffi /tmp/ab_new
      rm -rf xla_ffi && mkdir xla_ffi && cp runs/ab/base/* xla_ffi/ && rm -rf build
    fi
    # shellcheck disable=SC2086  # BASE_STEPS and NEW_STEPS are lists of steps
    (cd "$base_dir" && PATH=$base_path OUT=$OUT/base BENCH_ARGS=$bench_args \
      bash experiments/cuda_device_run.sh ${BASE_STEPS:-} bench) >"$OUT/base.log" 2>&1
    echo "base: $(grep 'build:' "$OUT/base.log")"
    if [ $built != 0 ]; then rm -rf xla_ffi && cp -r /tmp/ab_new xla_ffi && rm -rf build; fi
    # shellcheck disable=SC2086
    PATH=$new_path OUT=$OUT/new BENCH_ARGS=$bench_args \
      bash experiments/cuda_device_run.sh ${NEW_STEPS:-} bench >"$OUT/new.log" 2>&1
    grep -E "build:|passed|failed|SUMMARY" "$OUT/new.log" | tail -6
    python3 experiments/compare_bench.py "$OUT/base/bench/bench_kernel.json" \
      "$OUT/new/bench/bench_kernel.json" | tee "$OUT/compare.md"
    pack_out "$OUT" || exit 1 ;;
  *) sed -n 2,18p "$0"; exit 2 ;;
esac
