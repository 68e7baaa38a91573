#!/bin/bash
# call 9 (carries .data; after call 6's setup on the same machine): why the cached prefix
# through FlashAttention lost the long workload (-10%, ../results/h200-20261207/):
# torch.profiler over the long profile's mixed steps, with and without it, in one call.
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
d=$OUT/p; mkdir -p $d
echo "== profile long $(date +%T)"
timeout 470 python3 benchmarks/profile_step.py --model $TQ_MODEL --profile long --budget-s 450 \
  --dtypes turboquant@VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX=16384,turboquant --out-dir $d > $d/run.log 2>&1; echo "rc=$?"
tail -25 $d/run.log
echo "== done $(date +%T)"
tar -C $OUT -czf $OUT/p.tgz p && rm -rf $d
