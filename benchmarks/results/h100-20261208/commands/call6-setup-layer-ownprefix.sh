#!/bin/bash
# call 6c (carries bundle part 6 and .data): setup, then one SmolLM2 layer with the cached
# prefix through FlashAttention (layer_step.py's *_own_prefix ops) beside the committed
# paths and vLLM's FA3: what own_prefix costs per layer, op by op, and that it agrees
export PYTHONUNBUFFERED=1
cp .devbundle/p6/* /opt/tqb/ && bash /opt/tqb/setup-on-device.sh > $OUT/setup.log 2>&1; echo "setup rc=$?"; tail -1 $OUT/setup.log
source /opt/tqb/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
d=$OUT/c6; mkdir -p $d
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee $d/gpu.txt
python3 -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__)" | tee -a $d/gpu.txt
echo "== layer_step own_prefix $(date +%T)"
timeout 300 python3 benchmarks/layer_step.py --reps 30 --cases "continuation,96 dec,long mixed" \
  --json $d/layer_step.json > $d/layer_step.log 2>&1; echo "rc=$?"
grep -E "^==|own_prefix|prefill|forward_split|unpack|own_fa|fa3 |fa_forward|store" $d/layer_step.log | grep -v "^  *[0-9]" | cut -c1-150 | head -80
tar -C $OUT -czf $OUT/c6.tgz c6 && rm -rf $d
