#!/bin/bash
# call 7 (carries .data): the long workload in one call: ours with the cached prefixes through
# FlashAttention (own_prefix, opt-in), ours as committed, bf16; two timed runs each
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
mkdir -p $OUT/e2e
timeout 590 python3 benchmarks/e2e.py --model $TQ_MODEL --budget-s 575 --repeats 2 --out-dir $OUT/e2e --phases long --dtypes turboquant@VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX=16384,turboquant,auto > $OUT/e2e/e2e.log 2>&1; echo "rc=$?"
tail -30 $OUT/e2e/e2e.log
tar -C $OUT -czf $OUT/e2e-long.tgz e2e && rm -rf $OUT/e2e
