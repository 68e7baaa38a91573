#!/bin/bash
# call 6: bundle setup; the store sweep (issue shape and decode-step stores) against vLLM's
# bf16 / fp8 cache writes, which need vLLM
export PYTHONUNBUFFERED=1
cp .devbundle/p6/* /opt/tqb/ && bash /opt/tqb/setup-on-device.sh > $OUT/setup.log 2>&1; echo "setup rc=$?"; tail -1 $OUT/setup.log
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
mkdir -p $OUT/c6
echo "== store $(date +%T)"
timeout 200 python3 benchmarks/kernels.py --only store --rep-ms 25 --out $OUT/c6 > $OUT/c6/store.log 2>&1; echo "rc=$?"
grep "^store" $OUT/c6/store.log | grep graph
echo "== done $(date +%T)"
