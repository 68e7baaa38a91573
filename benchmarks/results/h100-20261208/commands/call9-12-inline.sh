#!/bin/bash
# calls 9-12 of the 2026-12-08 H100 lease, each its own `run` (no carry), back to back after
# call 8 on the same machine; the lines as they ran (call 10's script was named
# benchmarks/decode_splits_probe.py then, now benchmarks/decode_splits.py)
# call 9: TPOT shapes, one layer
source /opt/tqb/env.sh; mkdir -p $OUT/c11; timeout 200 python3 benchmarks/layer_step.py --reps 50 --cases "TPOT" --json $OUT/c11/layer_step_tpot.json > $OUT/c11/layer_step_tpot.log 2>&1
# call 10: decode split counts at small batches
source /opt/tqb/env.sh; mkdir -p $OUT/c12; cd benchmarks && timeout 150 python3 decode_splits_probe.py --json $OUT/c12/decode_splits.json > $OUT/c12/decode_splits.log 2>&1
# call 11: issue 3's prefill row (32K cached + 2K chunk, 32 / 8 heads, head 128)
source /opt/tqb/env.sh; d=$OUT/k; mkdir -p $d; timeout 170 python3 benchmarks/kernels.py --only prefill --rep-ms 25 --block-size 16 --out $d > $d/kernels.log 2>&1
# call 12: issue 3's decode row and SmolLM2's, every baseline in the same run
source /opt/tqb/env.sh; d=$OUT/k; mkdir -p $d; timeout 150 python3 benchmarks/kernels.py --only decode --rep-ms 25 --block-size 16 --out $d --shapes 32x16384x128x32x8,32x16384x64x9x3 > $d/kernels-decode.log 2>&1
