#!/bin/bash
# call 6 (carries bundle part 6 and .data): setup; (KERNELS=1: issue 3's decode and store table
# on this GPU, every baseline in the same run); then the GPU tests of the step workspace (a01dd78,
# never run on a GPU before): the own-keys path and the vLLM engines (greedy agreement with
# bf16, CUDA graphs vs eager, prefix-cache hits, KV capacity).
export PYTHONUNBUFFERED=1
cp .devbundle/p6/* /opt/tqb/ && bash /opt/tqb/setup-on-device.sh > $OUT/setup.log 2>&1; echo "setup rc=$?"; tail -1 $OUT/setup.log
source /opt/tqb/env.sh
export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
d=$OUT/c6; mkdir -p $d/kernels
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $d/gpu.txt
if [ -n "${KERNELS:-}" ]; then   # off in this lease: its device time went to failed starts
echo "== kernels decode,store $(date +%T)"
timeout 170 python3 benchmarks/kernels.py --only decode,store --rep-ms 25 --block-size 16 --out $d/kernels \
  --shapes 1x16384x128x32x8,8x16384x128x32x8,32x16384x128x32x8,32x32768x128x32x8,128x16384x128x32x8,1x2048x64x9x3,16x2048x64x9x3,96x8192x64x9x3 \
  > $d/kernels.log 2>&1; echo "rc=$?"
grep -E "^\|" $d/kernels.log | head -60
fi
echo "== pytest gpu own attention $(date +%T)"
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_own_attention_gpu.py > $d/pytest-own.log 2>&1; echo "rc=$?"; tail -3 $d/pytest-own.log
echo "== pytest gpu vLLM engines $(date +%T)"
timeout 230 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_vllm_gpu.py > $d/pytest-vllm.log 2>&1; echo "rc=$?"; tail -5 $d/pytest-vllm.log
echo "== done $(date +%T)"
tar -C $OUT -czf $OUT/c6.tgz c6 && rm -rf $d
