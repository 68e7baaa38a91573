#!/bin/bash
# call 7b (carries .data): the long workload, ours as committed, ours with the cached prefix
# through FlashAttention, and bf16, in one call (issue 6's long figure; the own_prefix A/B)
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
mkdir -p $OUT/e2e
timeout ${T:-578} python3 benchmarks/e2e.py --model $TQ_MODEL --budget-s $(( ${T:-578} - 23 )) --repeats 2 --out-dir $OUT/e2e --phases long \
  --dtypes 'turboquant,turboquant@VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX=16384,auto' > $OUT/e2e/e2e.log 2>&1; echo "rc=$?"
tail -30 $OUT/e2e/e2e.log
tar -C $OUT -czf $OUT/e2e.tgz e2e && rm -rf $OUT/e2e
