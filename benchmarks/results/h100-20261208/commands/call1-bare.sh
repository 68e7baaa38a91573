#!/bin/bash
# call 1 (bare machine; carries bundle part 1): unpack it, record the machine
mkdir -p /opt/tqb && cp .devbundle/p1/* /opt/tqb/
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $OUT/gpu.txt
nproc >> $OUT/gpu.txt; grep -m1 "model name" /proc/cpuinfo >> $OUT/gpu.txt
cat $OUT/gpu.txt
