"""Kernel tests: on a CUDA machine the real SD shapes, elsewhere small shapes under Triton's interpreter.

TRITON_INTERPRET must be set before triton (and so kernels) is imported: @triton.jit reads
it when a kernel is defined.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# the repository root, so that `import kernels` and `tests.kernels.utils` work under any rootdir
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_configure(config):
    # Triton's interpreter (3.6) turns 1-element arrays into Python ints the way NumPy 1.25 deprecated
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")
