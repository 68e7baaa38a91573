#!/bin/bash
# call 8 (carries .data): the short workload, ours, bf16 and vLLM's turboquant_4bit_nc in one
# call (TPOT at 1 and 16 requests and TTFT come with each engine)
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
mkdir -p $OUT/e2e
timeout ${T:-578} python3 benchmarks/e2e.py --model $TQ_MODEL --budget-s $(( ${T:-578} - 20 )) --repeats 2 --out-dir $OUT/e2e --phases short --dtypes turboquant,auto,turboquant_4bit_nc > $OUT/e2e/e2e.log 2>&1; echo "rc=$?"
tail -30 $OUT/e2e/e2e.log
tar -C $OUT -czf $OUT/e2e.tgz e2e && rm -rf $OUT/e2e
