import os

import torch

# Triton kernels run here (no GPU) only through the interpreter, and the flag must be set before any
# kernel is defined, i.e. before nepenthe.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
