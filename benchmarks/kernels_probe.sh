#!/bin/bash
# Device-call driver for benchmarks/kernels_probe.py (one call, < 5 minutes, logs under $OUT).
# usage: OUT=dir bash benchmarks/kernels_probe.sh [stages...]   stages: store sweep ncu shapes pytest
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/probe}; mkdir -p "$OUT"
P=benchmarks/kernels_probe.py
NCU_SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section SchedulerStats --section InstructionStats"
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    store) timeout ${STORE_S:-60} python3 $P store --json $OUT/probe.jsonl > $OUT/store.log 2>&1 ;;
    sweep) timeout ${SWEEP_T:-110} python3 $P sweep --budget-s ${SWEEP_S:-85} --best-out $OUT/best.json --json $OUT/probe.jsonl > $OUT/sweep.log 2>&1 ;;
    ncu)
      best=$(python3 -c "import json;print(json.dumps(json.load(open('$OUT/best.json'))[0]))" 2>/dev/null || echo '{"lookup":3,"block_n":128}')
      for v in ${NCU_BASE:+'{"lookup":1,"block_n":128}'} "$best"; do
        echo "--- ncu $v" >> $OUT/ncu.txt
        timeout ${NCU_S:-40} ncu --clock-control none --kernel-name regex:split --launch-skip 1 --launch-count 1 $NCU_SECTIONS python3 $P ncu "$v" >> $OUT/ncu.txt 2>&1
      done ;;
    shapes) timeout ${SHAPES_S:-90} python3 $P shapes --variants $OUT/best.json --json $OUT/probe.jsonl > $OUT/shapes.log 2>&1 ;;
    pytest) timeout ${PYTEST_S:-100} python3 -m pytest -m gpu -v --tb=line -rf ${PYTEST_K:+-k "$PYTEST_K"} tests/gpu/test_kernels_gpu.py > $OUT/pytest.log 2>&1 ;;
  esac
  echo "   rc=$? $(date +%T)"
done
grep -h '"op": "store_check"' $OUT/probe.jsonl 2>/dev/null | python3 -c "
import sys,json
for l in sys.stdin:
    r=json.loads(l); print(r['d'],r['name'],r['dtype'][6:],r['block_t'],r['warps'],r['rot'],'diff=%.4f untouched=%.3f rel=%.3f'%(r['byte_diff'],r['untouched'],r['decode_rel_err']),r['error'] or '')"
grep -h "store_time\|decode_sweep" $OUT/probe.jsonl | python3 -c "
import sys,json
for l in sys.stdin:
    r=json.loads(l); print(r['op'], r.get('variant', (r.get('block_t'),r.get('warps'),r.get('rot'))), '%.1f us %.0f GB/s'%(r['p50_us'],r['gbs']) if 'p50_us' in r else r.get('error'), 'diff=%.3g'%r['max_abs_diff_vs_pair'] if 'max_abs_diff_vs_pair' in r else '')"
tail -5 $OUT/pytest.log 2>/dev/null
