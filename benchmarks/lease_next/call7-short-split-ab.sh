#!/bin/bash
# call 7 (carries .data; after call 6's setup): the short workload's mixed steps (~110 decodes
# at 1-1.3K context + a fresh 1,024-token prompt) take the one-launch path, where each decode
# is a one-token chunk of the prefill kernel (a 128-row program for 3 rows, its whole context
# in one program). One layer of such steps, both paths (layer_step.py: forward_own_ws vs
# forward_split_own_ws), then the short workload with decodes always through the split-KV
# kernel (VLLM_TURBOQUANT_SPLIT_DECODE_CTX=0) beside the default and bf16, in one call.
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
d=$OUT/c7; mkdir -p $d/e2e
timeout 90 python3 benchmarks/layer_step.py --reps 30 --cases "short mixed,mixed 64 dec,TPOT" \
  --json $d/layer_step.json > $d/layer_step.log 2>&1; echo "layer_step rc=$?"
grep -E "^==|forward_own_ws|forward_split_own_ws|forward_ws|forward_split_ws|fa_forward|fa3 " $d/layer_step.log | cut -c1-120
left=$(( 570 - SECONDS ))
timeout $left python3 benchmarks/e2e.py --model $TQ_MODEL --budget-s $(( left - 15 )) --repeats 2 --out-dir $d/e2e --phases short \
  --dtypes 'turboquant,turboquant@VLLM_TURBOQUANT_SPLIT_DECODE_CTX=0,auto' > $d/e2e/e2e.log 2>&1; echo "e2e rc=$?"
tail -12 $d/e2e/e2e.log
grep -c "JIT compilation during inference" $d/e2e/e2e_turboquant*.log
tar -C $OUT -czf $OUT/c7.tgz c7 && rm -rf $d
