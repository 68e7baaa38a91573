#!/bin/bash
# call 10 (carries .data; after call 6's setup): the vLLM engine GPU tests with $TQ_MODEL
# (greedy agreement with bf16, CUDA graphs vs eager, prefix-cache hits, the window's KV
# reserve; six engine starts; never run since the step workspace and the $TQ_MODEL fix)
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
mkdir -p $OUT/t
echo "== pytest gpu vLLM engines (TQ_MODEL=$TQ_MODEL) $(date +%T)"
timeout 560 python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_vllm_gpu.py > $OUT/t/pytest-vllm.log 2>&1; echo "rc=$?"
grep -E "PASSED|FAILED|ERROR" $OUT/t/pytest-vllm.log | cut -c1-160; tail -3 $OUT/t/pytest-vllm.log
