#!/bin/bash
# call 11, on an H100 (the machine issue 3 names; after call 6's setup): issue 3's decode /
# store / prefill table, every baseline in the same run (FA3 and FA2 bf16, FA3 fp8, vLLM's
# TurboQuant decode; store vs vLLM's bf16 / fp8 cache writes; prefill 32K + 2K vs
# dequantize-then-FA), then the kernels' GPU suite (per-test log: a cut run still says which
# passed)
export PYTHONUNBUFFERED=1
source /opt/tqb/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
d=$OUT/k; mkdir -p $d
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > $d/gpu.txt
timeout 230 python3 benchmarks/kernels.py --only decode,store,prefill --rep-ms 25 --block-size 16 --out $d \
  --shapes 1x4096x128x32x8,1x16384x128x32x8,1x32768x128x32x8,8x16384x128x32x8,32x4096x128x32x8,32x16384x128x32x8,32x32768x128x32x8,128x16384x128x32x8,32x16384x64x16x4,1x2048x64x9x3,32x16384x64x9x3 \
  > $d/kernels.log 2>&1; echo "rc=$?"
grep -E "^(decode|store|prefill)" $d/kernels.log | cut -c1-220 | head -60
timeout 330 python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_kernels_gpu.py > $d/pytest-kernels.log 2>&1; echo "rc=$?"
grep -c PASSED $d/pytest-kernels.log; grep -E "FAILED|ERROR" $d/pytest-kernels.log | head; tail -2 $d/pytest-kernels.log
tar -C $OUT -czf $OUT/k.tgz k && rm -rf $d
