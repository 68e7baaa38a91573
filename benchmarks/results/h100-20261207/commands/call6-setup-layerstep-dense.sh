#!/bin/bash
# call 6 (carries bundle part 6 and .data): setup; then one SmolLM2 layer's steps with the
# prefill kernel's dense rows (the default since 2026-12-07: 3 rows per token for SmolLM2's
# groups of 3) and without (each token padded to 4 rows, the layout before), GPU and host us;
# each variant in its own process ($VLLM_TURBOQUANT_PREFILL_CONFIG is read once); then the
# prefill kernel's GPU tests (the dense rows never ran on a GPU before).
export PYTHONUNBUFFERED=1
cp .devbundle/p6/* /opt/tqb/ && bash /opt/tqb/setup-on-device.sh > $OUT/setup.log 2>&1; echo "setup rc=$?"; tail -1 $OUT/setup.log
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
d=$OUT/c6; mkdir -p $d
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > $d/gpu.txt; cat $d/gpu.txt
for v in 1 0; do
  echo "== layer_step dense_rows=$v $(date +%T)"
  VLLM_TURBOQUANT_PREFILL_CONFIG="{\"dense_rows\": $v}" timeout 110 python3 benchmarks/layer_step.py --reps 30 \
    --cases "continuation,long mixed,fresh 7700,mixed 96" --json $d/layer_step_dense$v.json > $d/layer_step_dense$v.log 2>&1; echo "rc=$?"
  grep -E "^==|  (prefill|prefill_own|forward_split_own_ws|forward_own_ws|fa_forward) " $d/layer_step_dense$v.log | cut -c1-120
done
echo "== pytest gpu: the prefill kernel's tests (dense rows now; G = 3 cases, invariance, own keys) $(date +%T)"
timeout 150 python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_kernels_gpu.py tests/gpu/test_own_attention_gpu.py \
  -k "prefill or aligned or own" > $d/pytest-prefill.log 2>&1; echo "rc=$?"
grep -c PASSED $d/pytest-prefill.log; grep -E "FAILED|ERROR" $d/pytest-prefill.log | cut -c1-160 | head; tail -1 $d/pytest-prefill.log
echo "== done $(date +%T)"
tar -C $OUT -czf $OUT/c6.tgz c6 && rm -rf $d
