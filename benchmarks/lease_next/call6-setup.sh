#!/bin/bash
# call 6 (carries bundle part 6 and .data): the bundle's setup and the package, nothing timed
export PYTHONUNBUFFERED=1
cp .devbundle/p6/* /opt/tqb/ && bash /opt/tqb/setup-on-device.sh > $OUT/setup.log 2>&1; echo "setup rc=$?"; tail -1 $OUT/setup.log
source /opt/tqb/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1; echo "pip rc=$?"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
