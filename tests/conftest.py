"""Test set-up: without a GPU, Triton kernels run in the interpreter (must be set before import)."""

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
