import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from twotower import _native

# Tests import the numpy references as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))
# Compile the native kernel into a fresh folder: the suite tests the build, not a cached library.
os.environ.setdefault("TWOTOWER_CACHE", tempfile.mkdtemp(prefix="twotower-test-cache-"))


@pytest.fixture(params=["screen", "native", "torch"])
def selection_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on each search path: bfloat16 screen + native rescoring, float32 multiply + native
    selection, and pure torch."""
    if request.param == "torch":
        monkeypatch.setattr(_native, "load", lambda: None)
        return "torch"
    if _native.load() is None:
        pytest.skip("no C compiler: the native selection kernel is unavailable")
    if request.param == "native":
        monkeypatch.setattr(_native, "bf16_matrix_units", lambda: False)
    elif not _native.bf16_matrix_units():
        pytest.skip("this CPU has no bfloat16 matrix units: the screened path is not taken")
    return str(request.param)
