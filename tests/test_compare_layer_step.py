"""benchmarks/compare_layer_step.py: the ratio table of two layer_step.py runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare_layer_step import compare  # noqa: E402


def _run(gpu_prefill, gpu_fa, case="fresh 7700-token prompt"):
    return {"device": "test", "torch": "t", "triton": "t",
            "cases": [{"case": case, "ops": {
                "prefill": {"host_us": 100.0, "gpu_us": gpu_prefill},
                "decode": {"host_us": 0.0, "gpu_us": 0.01},     # not run in this case
                "fa3": {"host_us": 50.0, "gpu_us": gpu_fa}}}]}


def test_ratios_and_skipped_ops():
    rows = compare(_run(80.0, 200.0), _run(100.0, 100.0))
    assert [(r["op"], round(r["ratio"], 3)) for r in rows] == [("prefill", 0.8), ("fa3", 2.0)]


def test_cli_writes_json_and_refuses_different_cases(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.json"))
    a.write_text(json.dumps(_run(80.0, 200.0)))
    b.write_text(json.dumps(_run(100.0, 100.0)))
    c.write_text(json.dumps(_run(100.0, 100.0, case="another")))
    out = tmp_path / "out.json"
    script = str(ROOT / "benchmarks" / "compare_layer_step.py")
    res = subprocess.run([sys.executable, script, str(a), str(b), "--json", str(out)],
                         capture_output=True, text=True, check=True)
    assert "| fresh 7700-token prompt | prefill | 80.0 | 100.0 | 0.800 |" in res.stdout
    assert [r["op"] for r in json.loads(out.read_text())["rows"]] == ["prefill", "fa3"]
    bad = subprocess.run([sys.executable, script, str(a), str(c)], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "differ in cases" in bad.stderr
    with pytest.raises(SystemExit):
        compare(json.loads(a.read_text()), json.loads(c.read_text()))
    # a run with a case more is no pair either (zip alone would drop the extra case)
    longer = json.loads(a.read_text())
    longer["cases"].append(dict(longer["cases"][0], case="another"))
    with pytest.raises(SystemExit, match="differ in cases"):
        compare(json.loads(a.read_text()), longer)
