"""keep_freed_memory: a prefill's freed activations are reused instead of being faulted in again."""

import os
import subprocess
import sys

import pytest

# The bench preset's 512-token prefill: its activations (up to 8 MB each) are what glibc's default
# hands back to the kernel and faults in again on the next forward.
PROBE = """
import resource, sys, torch
from dsv3.config import ModelArgs
from dsv3.memory import keep_freed_memory
from dsv3.model import Transformer
ok = keep_freed_memory() if sys.argv[1] == "keep" else True
torch.manual_seed(0)
model = Transformer(ModelArgs.preset("bench")).eval()
x = torch.randint(0, 1000, (1, 512))
with torch.inference_mode():
    for _ in range(2):
        model(x, 0, last_only=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, 0, last_only=True)
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env, timeout=300).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_prefill_activations():
    ok, kept = _faults("keep")
    _, default = _faults("default")
    assert ok == "True"
    assert default > 5000, default  # glibc's default: thousands of 4 KB pages faulted in again per prefill
    assert kept < default / 10, (kept, default)
