#!/bin/bash
# call 1 (bare machine; carries bundle part 1): unpack it, record the machine
mkdir -p /opt/tqb && cp .devbundle/p1/* /opt/tqb/
mkdir -p $OUT/c1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/c1/gpu.txt 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/c1/gpu.txt
nproc >> $OUT/c1/gpu.txt; grep -m1 "model name" /proc/cpuinfo >> $OUT/c1/gpu.txt
cat $OUT/c1/gpu.txt
