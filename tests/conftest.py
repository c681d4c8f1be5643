import os

import torch

# Triton kernels run here (no GPU) only through the interpreter, and the flag must be set before any
# kernel is defined, i.e. before nepenthe.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run, so a red CI always means a change, never a
# new random draw. `HYPOTHESIS_PROFILE=explore pytest ...` searches fresh examples (and keeps a
# database of failures) when hunting for bugs.
from hypothesis import settings  # noqa: E402

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
