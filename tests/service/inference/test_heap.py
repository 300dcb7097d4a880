"""The model's process keeps the memory a forward pass frees mapped for the next pass (glibc)."""

import subprocess
import sys

# Three 6 MB blocks alive at once, then all freed, like a forward pass's activations; minor page faults per round
# after the first. glibc's defaults give each round fresh pages (the blocks are mmapped, or the heap is trimmed).
_ROUNDS = """
import resource, sys
import numpy as np
from service.inference.heap import keep_model_heap_mapped
if sys.argv[1] == "keep":
    assert keep_model_heap_mapped()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(11):
    if i == 1:
        start = faults()
    blocks = [np.ones(1_500_000, np.float32) for _ in range(3)]
    del blocks
print((faults() - start) / 10)
"""


def faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_the_models_heap_keeps_freed_activations_mapped() -> None:
    # of the blocks' ~4400 pages, glibc's defaults (2.36) fault ~1000 in again every round: a trimmed heap top
    assert faults_per_round("default") > 500, "glibc's defaults no longer give the pages back: is this still needed?"
    assert faults_per_round("keep") < 50
