#!/bin/bash
# call 6 (carries bundle part 6 and .data): setup; the vLLM engine tests first (greedy
# agreement with bf16, graphs vs eager, prefix-cache hits, the window's KV reserve: six engine
# starts, $TQ_MODEL from env.sh; never run with the step workspace); then, as time allows, one
# SmolLM2 layer's mixed steps, the forward as it was (forward*: buffers allocated and zeroed
# per layer) beside the workspace's (forward*_ws), host and GPU us. The own-keys GPU tests
# passed on 2026-12-07 (../results/h200-20261207/), not repeated.
export PYTHONUNBUFFERED=1
cp .devbundle/p6/* /opt/tqb/ && bash /opt/tqb/setup-on-device.sh > $OUT/setup.log 2>&1; echo "setup rc=$?"; tail -1 $OUT/setup.log
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
mkdir -p $OUT/c6
echo "== pytest gpu vLLM engines (TQ_MODEL=$TQ_MODEL) $(date +%T)"
timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vllm_gpu.py > $OUT/c6/pytest-vllm.log 2>&1; echo "rc=$?"; tail -5 $OUT/c6/pytest-vllm.log
echo "== layer_step $(date +%T)"
timeout 140 python3 benchmarks/layer_step.py --reps 30 --cases "long mixed,fresh 7700,mixed 64" --json $OUT/c6/layer_step.json > $OUT/c6/layer_step.log 2>&1; echo "rc=$?"
grep -E "^==|  forward" $OUT/c6/layer_step.log | head -40
echo "== done $(date +%T)"
