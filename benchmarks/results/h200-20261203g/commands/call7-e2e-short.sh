#!/bin/bash
# call 7: e2e short workload (plus TPOT and TTFT), each measurement twice per engine:
# ours, bf16, vLLM's turboquant_4bit_nc (last: it takes what is left for its Triton compile)
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
mkdir -p $OUT/e2e-short
timeout 592 python3 benchmarks/e2e.py --model $TQ_MODEL --budget-s 585 --repeats 2 --out-dir $OUT/e2e-short --phases short --dtypes turboquant,auto,turboquant_4bit_nc > $OUT/e2e-short/e2e.log 2>&1; echo "rc=$?"
tail -12 $OUT/e2e-short/e2e.log
