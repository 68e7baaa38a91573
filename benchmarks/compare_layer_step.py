"""Two layer_step.py JSONs side by side: GPU us of every op in every case, and their ratio.

    python benchmarks/compare_layer_step.py A.json B.json [--json OUT.json]

A and B must hold the same cases (e.g. one run per value of a knob, as
benchmarks/lease_next/call6-setup-layerstep-dense.sh makes). Prints a markdown table
(ratio = A / B) and writes the rows as JSON with --json.
"""

from __future__ import annotations

import argparse
import json


def compare(a: dict, b: dict) -> list[dict]:
    """One row per (case, op) that both runs timed on a GPU."""
    rows = []
    if len(a["cases"]) != len(b["cases"]):
        raise SystemExit(f"the runs differ in cases: {len(a['cases'])} vs {len(b['cases'])}")
    for ca, cb in zip(a["cases"], b["cases"]):
        if ca["case"] != cb["case"]:
            raise SystemExit(f"the runs differ in cases: {ca['case']!r} vs {cb['case']!r}")
        for op, ra in ca["ops"].items():
            rb = cb["ops"].get(op, {})
            ga, gb = ra.get("gpu_us"), rb.get("gpu_us")
            if ga and gb and ga > 0.5:          # ops a case does not run time ~0
                rows.append({"case": ca["case"], "op": op, "a_gpu_us": ga, "b_gpu_us": gb,
                             "ratio": ga / gb, "a_host_us": ra["host_us"],
                             "b_host_us": rb["host_us"]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    a, b = (json.load(open(p)) for p in (args.a, args.b))
    rows = compare(a, b)
    print(f"A = {args.a}, B = {args.b}; {a['device']}, torch {a['torch']}, "
          f"triton {a['triton']}\n")
    print("| case | op | A GPU us | B GPU us | A / B | host us A / B |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['op']} | {r['a_gpu_us']:.1f} | {r['b_gpu_us']:.1f} | "
              f"{r['ratio']:.3f} | {r['a_host_us']:.0f} / {r['b_host_us']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": args.a, "b": args.b, "device": a["device"], "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
