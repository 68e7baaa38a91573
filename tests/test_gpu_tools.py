"""The GPU diagnostics stay runnable: tests/gpu/crash_matrix.py's source patches must still
apply to the kernel they edit (they are text edits; a refactor silently breaks them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_crash_matrix_patches_apply_to_the_prefill_kernel():
    spec = importlib.util.spec_from_file_location("crash_matrix",
                                                  ROOT / "tests/gpu/crash_matrix.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    src = (ROOT / "kernels/prefill.py").read_text()
    assert cm.PATCHES
    for name, edits in cm.PATCHES.items():
        for old, _ in edits:
            assert src.count(old) == 1, f"patch {name!r} no longer matches kernels/prefill.py"
    used = {part for case in cm.CASES.values() for part in case[6].get("patch", "").split("+")}
    assert used - {""} <= set(cm.PATCHES)
