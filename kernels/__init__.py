"""Triton kernels of nepenthe (installed as ``nepenthe.kernels``).

Empty in this version: every op runs on its pure-PyTorch reference in ``nepenthe.ops``. The fused
Triton kernels (sign histograms, fused activation + histogram, masked optimizer steps) are the
subject of the kernels issue and will live here, one file per op.
"""
