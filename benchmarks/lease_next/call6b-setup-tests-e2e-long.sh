#!/bin/bash
# call 6b, for a lease with ~10 minutes left after the bootstrap (carries bundle part 6 and
# .data): setup; the prefill kernel's GPU tests at SmolLM2's shape (9 / 3 heads: the dense
# rows' case) and the invariance test; then the long workload, ours as committed vs dense rows
# on every path, in the time left (no bf16 engine: the ratio to bf16 comes from a same-day
# call 7 or not at all)
export PYTHONUNBUFFERED=1
t0=$(date +%s)
cp .devbundle/p6/* /opt/tqb/ && bash /opt/tqb/setup-on-device.sh > $OUT/setup.log 2>&1; echo "setup rc=$?"; tail -1 $OUT/setup.log
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
d=$OUT/c6; mkdir -p $d/e2e
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > $d/gpu.txt; cat $d/gpu.txt
echo "== pytest gpu prefill, 9/3 heads $(date +%T)"
timeout 90 python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_kernels_gpu.py \
  -k "prefill and 9-3" > $d/pytest-prefill.log 2>&1; echo "rc=$?"
grep -c PASSED $d/pytest-prefill.log; grep -E "FAILED|ERROR" $d/pytest-prefill.log | cut -c1-160 | head; tail -1 $d/pytest-prefill.log
left=$(( 575 - ($(date +%s) - t0) ))
echo "== e2e long, $left s left $(date +%T)"
timeout $left python3 benchmarks/e2e.py --model $TQ_MODEL --budget-s $(( left - 15 )) --repeats 2 --out-dir $d/e2e --phases long \
  --dtypes 'turboquant,turboquant@VLLM_TURBOQUANT_PREFILL_CONFIG={"dense_rows":1}' > $d/e2e/e2e.log 2>&1; echo "rc=$?"
tail -20 $d/e2e/e2e.log
tar -C $OUT -czf $OUT/c6.tgz c6 && rm -rf $d
