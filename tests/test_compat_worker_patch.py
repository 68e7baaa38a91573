"""The worker-side patch must not import the other platform's worker.

Importing vllm.v1.worker.cpu_worker replaces torch.cuda.current_stream with a placeholder
(vllm/v1/worker/cpu/shm.py). When our memory-reservation patch imported it on a GPU, every
CUDA engine with a TurboQuant dtype died in its first profiling step (H100, vLLM 0.25).
"""

import subprocess
import sys

CHECK = """
import sys, torch
before = torch.cuda.current_stream
from vllm_turboquant import compat
compat._patch_memory_reserve()
assert "vllm.v1.worker.cpu_worker" not in sys.modules, "cpu_worker was imported"
assert torch.cuda.current_stream is before, "torch.cuda.current_stream was replaced"
print("ok")
"""


def test_memory_patch_imports_no_worker_module():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
