#!/usr/bin/env bash
# On a GPU machine, from the repository root: builds the extension (sm_90) and runs the steps
# named as arguments, in order:
#   quick    - D = 1 kernel timings (no reference)
#   tune     - the launch-plan sweep (experiments/tune_kernel.py;
#              TUNE_FAMILY: one or more of plans slabs prefetch balance sync tail small
#              fwdprefetch bwdthreads bwd512 bwdsync bwdstaged ...: FAMILIES in
#              tune_kernel.py)
#   model    - experiments/sm_bandwidth.cu, the standalone model of what one SM can stream
#   batches  - one case at several batch sizes: the cost of a partial last wave
#   trace    - line timelines of the TMA forward's blocks (experiments/tma_trace.py; TRACE_ARGS)
#   smmap    - which SMs share a GPC (experiments/sm_gpc_map.cu; SMMAP_ARGS: SM ids to mark)
#   test     - the GPU tests (tests/test_cuda_kernel.py; PYTEST_K selects with -k, which also
#              matches "pytestmark", the attribute of every decorated test: "tma" selects nearly
#              all, "tma_forward" the TMA tests;
#              CGSPN_TEST_SHARD=0/2, then 1/2, splits the suite over two device calls: with the
#              build it no longer fits one call's 600 s. Each half takes about 420 s (v23), so
#              with the ~100 s build neither leaves room for `sanitize` (~80 s): run that in a
#              call of its own, or beside `bench`)
#   testpar  - the same tests split over TEST_PROCS (default 4) pytest processes at once, each
#              a CGSPN_TEST_SHARD of the selection, one log each, every result line kept (-v) so
#              a shard cut by its timeout (TEST_TIMEOUT, default 400 s) still says what passed.
#              The suite is mostly compile time on the host, which the machine's 16 cores share;
#              the kernels share the one GPU, which only the timings would mind. TEST_PROCS=8
#              TEST_TIMEOUT=440 ran the whole suite (415) in 289 s of one call (H200, build
#              included: 368 s; 2026-11-29).
#   sanitize - compute-sanitizer memcheck and racecheck on experiments/sanitize_case.py
#   bench    - the full benchmark (experiments/bench_kernel.py; BENCH_ARGS, e.g. --no-reference)
#   chunk    - chunked against global scans (experiments/bench_chunk.py; CHUNK_ARGS)
#   ncu      - Nsight Compute (speed of light, stalls, memory, per-instruction stall samples as
#              CSV, and that CSV's summary by experiments/ncu_stalls.py as <case>.stalls.md) of the
#              kernels of NCU_CASES, each "fwd|bwd B,C,H,W G dtype D", separated by ';'
#   traffic  - Nsight Compute's DRAM bytes read and written, time and L2 hit rate of the kernels
#              of NCU_CASES (same form): what a case moves against its byte floor
#   pack     - (last) every file under $OUT but the markdown into $OUT/results.tar.gz: the device
#              tool returns at most 8 files, and a testpar or ncu call writes more
# A call made while the machine is still held (within its idle window after the last one) finds
# that call's build: an unchanged tree builds in ~5 s instead of ~100 (2026-11-29, H200), so
# chained calls leave their time to the tests and timings.
# Logs and results go under $OUT (default runs/device). Two kernel versions timed side by side in
# one device call: experiments/cuda_device_ab.sh.
set -u
source "$(dirname "$0")/device_pack.sh"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s; $(python3 -c 'import cgspn_jax; print(cgspn_jax.build_info())')"
rc=0
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    quick) timeout 150 python3 experiments/bench_kernel.py --quick --out "$OUT/quick" || rc=1 ;;
    tune) for fam in ${TUNE_FAMILY:-plans}; do
            timeout 400 python3 experiments/tune_kernel.py sweep --family "$fam" \
              --out "$OUT/tune_$fam" >"$OUT/tune_$fam.log" 2>&1 || rc=1
            echo "family $fam:"; grep -A30 "^| case" "$OUT/tune_$fam.log"
          done ;;
    model) nvcc -O3 -std=c++17 --use_fast_math -arch=sm_90 -o /tmp/smbw experiments/sm_bandwidth.cu \
             && timeout 200 /tmp/smbw >"$OUT/sm_bandwidth.txt" 2>&1 || rc=1
           tail -30 "$OUT/sm_bandwidth.txt" ;;
    trace) timeout 300 python3 experiments/tma_trace.py --out "$OUT/trace" ${TRACE_ARGS:-} || rc=1 ;;
    smmap) nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/smgpc experiments/sm_gpc_map.cu \
             && timeout 120 /tmp/smgpc ${SMMAP_ARGS:-0 1 2 3 16 17 48 49 50 51 124 125 128 129 130 131} \
             >"$OUT/sm_gpc_map.txt" 2>&1 || rc=1
           cat "$OUT/sm_gpc_map.txt" ;;
    batches) timeout 200 python3 experiments/tune_kernel.py batches --out "$OUT/batches" || rc=1 ;;
    test) timeout 520 python3 -m pytest -q -x -p no:cacheprovider --durations=12 ${PYTEST_K:+-k "$PYTEST_K"} tests/test_cuda_kernel.py \
            >"$OUT/pytest.log" 2>&1 || rc=1; tail -25 "$OUT/pytest.log" ;;
    testpar)
      n=${TEST_PROCS:-4}; pids=()
      rm -f "$OUT"/pytest_[0-9]*.log  # an earlier call's on a machine still held
      for i in $(seq 0 $((n - 1))); do
        CGSPN_TEST_SHARD=$i/$n timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -v -p no:cacheprovider \
          --durations=5 ${PYTEST_K:+-k "$PYTEST_K"} tests/test_cuda_kernel.py >"$OUT/pytest_$i.log" 2>&1 &
        pids+=($!)
      done
      for i in "${!pids[@]}"; do
        wait "${pids[$i]}"; code=$?
        # 5: no test in this shard (the shards are cut before -k selects, so a small
        # selection can leave one empty).
        [ $code -ne 0 ] && [ $code -ne 5 ] && rc=1
        echo "shard $i/$n: exit $code; $(grep -c ' PASSED' "$OUT/pytest_$i.log") passed;" \
          "$(tail -1 "$OUT/pytest_$i.log")"
      done
      grep -h -E "^(FAILED|ERROR)|(FAILED|ERROR) +\[" "$OUT"/pytest_*.log | cut -c1-220 | head -20 ;;
    sanitize)
      for tool in memcheck racecheck; do
        # Only this library's kernels (Gspn*) are checked: XLA's own are not ours to judge.
        timeout 240 compute-sanitizer --tool $tool --kernel-name kns=Gspn --error-exitcode 9 \
          python3 experiments/sanitize_case.py >"$OUT/sanitize_$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_case done" "$OUT/sanitize_$tool.log"
      done ;;
    ncu)
      # One report per case: the summary sections as text, the warp-state breakdown, and the
      # per-instruction (SASS) stall samples as CSV, to find the instructions a line waits on.
      IFS=';' read -ra cases <<<"${NCU_CASES:-bwd 32,1152,64,64 1152 float32 1}"
      for c in "${cases[@]}"; do
        set -- $c
        name="ncu_$1_${2//,/x}_$3_$4_$5"
        timeout 150 ncu --clock-control none -k regex:Gspn --launch-skip 2 --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section LaunchStats \
          --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          --section SourceCounters --import-source no -f -o "/tmp/$name" \
          python3 experiments/tune_kernel.py one "$@" >"/tmp/$name.log" 2>&1
        echo "$name: exit $?"
        ncu -i "/tmp/$name.ncu-rep" --page details --print-details all >"$OUT/$name.txt" 2>&1
        ncu -i "/tmp/$name.ncu-rep" --page source --print-source sass --csv >"$OUT/$name.csv" 2>&1
        python3 experiments/ncu_stalls.py "$OUT/$name.csv" >"$OUT/$name.stalls.md" || rc=1
        grep -E "^ +(Duration|DRAM Throughput|Registers Per Thread|Achieved Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Stall Long Scoreboard|Stall Barrier)" "$OUT/$name.txt"
      done ;;
    traffic)
      IFS=';' read -ra cases <<<"${NCU_CASES:-bwd 32,1152,64,64 1152 float32 1}"
      for c in "${cases[@]}"; do
        echo "== $c" | tee -a "$OUT/traffic.log"
        timeout 60 ncu --clock-control none -k regex:Gspn --launch-skip 2 --launch-count 1 \
          --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
          python3 experiments/tune_kernel.py one $c >/tmp/traffic_one.log 2>&1 || rc=1
        grep -E "gpu__time|dram__bytes|lts__t|V=|rror" /tmp/traffic_one.log | sed 's/^ *//' | cut -c1-200 \
          | tee -a "$OUT/traffic.log"
      done ;;
    chunk) timeout 300 python3 experiments/bench_chunk.py --out "$OUT/chunk" ${CHUNK_ARGS:-} || rc=1 ;;
    bench) timeout 560 python3 experiments/bench_kernel.py ${BENCH_ARGS:-} --out "$OUT/bench" || rc=1 ;;
    pack) pack_out "$OUT" || rc=1 ;;
  esac
  echo "step $step: $(( $(date +%s) - t0 )) s"
done
exit $rc
