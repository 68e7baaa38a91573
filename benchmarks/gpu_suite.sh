#!/usr/bin/env bash
# One stage of the GPU measurements, run on the device machine after the vLLM bundle bootstrap
# (../shared/device/README.md). Each stage fits in one 10-minute device call and leaves one
# archive, $OUT/STAGE.tgz, with its logs and JSON (the device returns at most 8 files).
#
#   bash benchmarks/gpu_suite.sh gputests|crashmatrix|verify|layerstep|kernels|quality|e2e|serving|tp
#   bash benchmarks/gpu_suite.sh decodeab     # no bootstrap needed: decode variants only
#
# quality: DTYPES (perplexity rows, default below) and CHECKS (dtypes of the greedy-token
# consistency checks, default turboquant,auto; empty = none) split it over two calls;
# QUALITY_ARGS go to quality_vllm.py (e.g. --batch-invariant). gputests: TESTS_TIMEOUT (300 s).
#
# Expects the English text at .data/text/austen.txt (python -m vllm_turboquant.textdata, then
# copy it there; .data/ is git-ignored and carried to the device).
set -uo pipefail
stage=${1:?stage}
if [ "$stage" = decodeab ]; then
  # Decode variants (kernels.py DECODE_AB) on a bare GPU machine: torch + triton only, no
  # vLLM bundle, no install (tests/conftest.py maps kernels/ to vllm_turboquant.kernels).
  out=${OUT:-/tmp/out}/decodeab
  mkdir -p "$out"
  # DECODEAB_ARGS: more kernels.py options, e.g. the TPOT shapes with the split-count sweep:
  # DECODEAB_ARGS="--only decode_ab,sweep --sweep-decode-only --block-size 128
  #                --shapes 1x2048x64x9x3,16x2048x64x9x3"
  PYTHONUNBUFFERED=1 timeout 300 python3 benchmarks/kernels.py --only decode_ab --rep-ms 25 \
    --out "$out" ${DECODEAB_ARGS:-} 2>&1 | tee "$out/decode_ab.log"
  rc=${PIPESTATUS[0]}
  tar -C "${OUT:-/tmp/out}" -czf "${OUT:-/tmp/out}/decodeab.tgz" decodeab && rm -rf "$out"
  exit "$rc"
fi
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data PYTHONUNBUFFERED=1
# vLLM 0.25's V2 model runner failed with our dtypes in its sampler's memory-profiling run
# ("Pointer argument cannot be accessed from Triton (cpu tensor?)"); root cause open. Every
# dtype, baselines included, runs on the V1 runner so the comparison stays like for like.
export VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER:-0}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/pip.log 2>&1 ||
  { cat /tmp/pip.log; exit 1; }
top=${OUT:-/tmp/out}
out=$top/$stage
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
case $stage in
  gputests)
    timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider \
      tests/gpu/test_kernels_gpu.py 2>&1 | tee "$out/gpu-tests.log" ;;
  crashmatrix)
    # Which launch faults (head-128 window prefill, 2026-11-23): each case in its own process.
    timeout 400 python3 tests/gpu/crash_matrix.py --jobs 6 --json "$out/crash_matrix.json" 2>&1 |
      tee "$out/crash_matrix.log" ;;
  verify)
    # The correctness pair at once (about 4 minutes on an H200, 2026-12-02): the GPU suite and
    # the crash matrix (each case in its own process) share the GPU; nothing here is timed.
    timeout 250 python3 tests/gpu/crash_matrix.py --jobs 6 --json "$out/crash_matrix.json" \
      >"$out/crash_matrix.log" 2>&1 &
    timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py \
      >"$out/gpu-tests.log" 2>&1
    rc_tests=$?
    wait
    cat "$out/crash_matrix.log"
    tail -3 "$out/gpu-tests.log"
    (exit $rc_tests) ;;
  layerstep)
    # One attention layer's step, host and GPU time vs FlashAttention, and the prefill launch
    # sweep; `layer_step.py --best $out/layer_step.json` prints the winning config.
    # LAYERSTEP_ARGS (default --sweep): e.g. "" for the cases alone (the TPOT decode-only
    # steps included), with FlashAttention's decode and cache write beside each.
    timeout 420 python3 benchmarks/layer_step.py ${LAYERSTEP_ARGS---sweep} \
      --json "$out/layer_step.json" 2>&1 |
      tee "$out/layer_step.log" ;;
  kernels)
    timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py \
      2>&1 | tee "$out/gpu-tests.log"
    timeout 330 python3 benchmarks/kernels.py --out "$out" 2>&1 | tee "$out/kernels.log" ;;
  quality)
    timeout 560 python3 benchmarks/quality_vllm.py --model "$TQ_MODEL" --json "$out/quality.json" \
      --dtypes "${DTYPES-auto,fp8,turboquant,tq-k4v4,tq-k3v3}" \
      --check-dtype "${CHECKS-turboquant,auto}" --log-dir "$out/logs" ${QUALITY_ARGS:-} 2>&1 |
      tee "$out/quality.log"
    rm -f "$out"/logs/*.args.json ;;
  e2e)
    timeout 570 python3 benchmarks/e2e.py --model "$TQ_MODEL" --budget-s 540 --out-dir "$out" ${E2E_ARGS:-} \
      2>&1 | tee "$out/e2e.log" ;;
  serving)
    timeout 560 python3 benchmarks/serving_compare.py --model "$TQ_MODEL" --out-dir "$out" \
      2>&1 | tee "$out/serving.log" ;;
  tp)
    # The tiny model has head size 128: since 2026-12-02 the 4-bit presets are verified there
    # (settings.check_verified_on_gpu); the TP run with the window default is not re-run yet.
    python3 benchmarks/make_tiny_llama.py /tmp/tiny-llama --tokenizer "$TQ_MODEL" &&
      timeout 500 python3 benchmarks/tp_compare.py --model /tmp/tiny-llama --json "$out/tp.json" \
        2>&1 | tee "$out/tp.log" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
rc=${PIPESTATUS[0]}
tar -C "$top" -czf "$top/$stage.tgz" "$stage" && rm -rf "$out"
exit "$rc"
