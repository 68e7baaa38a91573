#!/bin/bash
# call 7 (carries .data; after call 6's setup): where the short workload's steps go, ours vs
# bf16 (step_log.py: every engine step's kind and wall time; the short workload's sizes: 400
# x (1,024 in, 256 out) at 1 GiB of KV), to see whether mixed or decode steps keep ours at
# 1.24-1.38x bf16 there while the long workload gives 1.6x (benchmarks/results/h100-20261208/)
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
d=$OUT/sl; mkdir -p $d
timeout 560 python3 benchmarks/step_log.py --model $TQ_MODEL --dtypes turboquant,auto \
  --requests 400 --prompt-len 1024 --output-len 256 --kv-bytes 1073741824 --budget-s 540 \
  --out-dir $d > $d/run.log 2>&1; echo "rc=$?"
tail -30 $d/run.log
tar -C $OUT -czf $OUT/sl.tgz sl && rm -rf $d
