#!/bin/bash
# call 7 (the 55 s left after call 6, same machine): issue 3's store shape on the H100
source /opt/tqb/env.sh; python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1; mkdir -p $OUT/k; timeout 42 python3 benchmarks/kernels.py --only store --rep-ms 20 --out $OUT/k > $OUT/k/store.log 2>&1; echo rc=$?; grep -E "^store" $OUT/k/store.log | cut -c1-200 | head -20
