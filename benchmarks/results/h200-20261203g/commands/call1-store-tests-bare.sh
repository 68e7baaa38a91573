#!/bin/bash
# call 1 (bare machine, bundle part 1 copied): GPU tests of the store with the 16-bit
# rotation dot as its default (every config option against the codec, the window side)
# and the decode / prefill tests that read what it writes
export PYTHONUNBUFFERED=1
mkdir -p /opt/tqb && cp .devbundle/p1/* /opt/tqb/
mkdir -p $OUT/c1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/c1/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/c1/gpu.txt
echo "== pytest store $(date +%T)"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py -k "store" > $OUT/c1/pytest-store.log 2>&1; echo "rc=$?"; tail -4 $OUT/c1/pytest-store.log
echo "== pytest decode and prefill with the new store $(date +%T)"
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider -x tests/gpu/test_kernels_gpu.py -k "(decode or prefill) and not rotq_regs and not replayed" > $OUT/c1/pytest-rest.log 2>&1; echo "rc=$?"; tail -4 $OUT/c1/pytest-rest.log
echo "== done $(date +%T)"
