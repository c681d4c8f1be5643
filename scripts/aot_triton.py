#!/usr/bin/env python
"""Compile every nepenthe Triton kernel ahead of time for an NVIDIA GPU, without a GPU.

Every specialisation the GPU launchers of ``nepenthe/kernels/`` can produce (each op's ``aot_specializations``:
every dtype, activation kind, tile shape and unit-stride axis) goes through the full Triton pipeline
down to a cubin for the target architecture (default sm_90, H100). One line per kernel; the exit
status is non-zero when any kernel fails to compile.

    python scripts/aot_triton.py                 # all kernels, sm_90
    python scripts/aot_triton.py --arch 80 -k masked_sgd --jobs 2

The Triton interpreter must be off for this (``TRITON_INTERPRET=1`` makes ``triton.jit`` return
interpreted functions): the variable is removed here before Triton is imported. Compiled kernels
go to a fresh temporary cache unless ``--cache-dir`` is given, so every run really compiles.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported, by us or by the kernels

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPECS: list = []


def specializations(pattern: str | None = None) -> list:
    """(name, kernel, signature, constexprs, options) of every kernel specialisation, from the source tree."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from nepenthe.kernels import activation_histogram, masked_optim, sign_histogram

    specs = []
    for module in (sign_histogram, activation_histogram, masked_optim):
        specs.extend(module.aot_specializations())
    return [s for s in specs if pattern is None or pattern in s[0]]


def _compile(index_and_arch: tuple[int, int]) -> tuple[str, float, str | None, str]:
    import triton
    from triton.backends.compiler import GPUTarget

    index, arch = index_and_arch
    name, kernel, signature, constexprs, options, aligned = _SPECS[index]
    names = list(signature)
    # what the JIT derives for 16-byte-aligned pointers and sizes/strides that are multiples of 16
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    start = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
        info = f"{_resources(compiled.asm['cubin'])}smem {compiled.metadata.shared} B, " \
               f"{options.get('num_warps', 4)} warps"
        return name, time.perf_counter() - start, None, info
    except Exception as exc:  # report every failure, keep compiling the rest
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return name, time.perf_counter() - start, detail or repr(exc), ""


def _resources(cubin: bytes) -> str:
    """Registers / spills of the kernel from the cubin, via Triton's bundled cuobjdump (when present)."""
    try:
        import subprocess

        from triton.backends.nvidia import compiler as nvidia

        tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
        if not os.path.exists(tool):
            return ""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        for line in out.splitlines():
            if "REG:" in line:
                fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
                return f"{fields.get('REG', '?')} regs, local {fields.get('LOCAL', '?')} B, "
    except Exception:  # resource usage is informative only
        pass
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (default 90: H100)")
    parser.add_argument("-k", dest="pattern", help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compile processes")
    parser.add_argument("--cache-dir", help="Triton cache directory (default: a fresh temporary one)")
    parser.add_argument("--list", action="store_true", help="list the specialisations and exit")
    args = parser.parse_args(argv)

    try:
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"triton is not importable: {exc}", file=sys.stderr)
        return 2
    _SPECS[:] = specializations(args.pattern)
    if args.list:
        for spec in _SPECS:
            print(spec[0])
        return 0
    if not _SPECS:
        print("no kernel matches", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="nepenthe-aot-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir or tmp
        start = time.perf_counter()
        work = [(i, args.arch) for i in range(len(_SPECS))]
        if args.jobs > 1:
            with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
                results = pool.imap(_compile, work)
                failures = _report(results)
        else:
            failures = _report(map(_compile, work))
        total = time.perf_counter() - start
    print(f"{len(_SPECS) - failures}/{len(_SPECS)} kernels compiled for sm_{args.arch} in {total:.1f} s"
          + (f"; {failures} FAILED" if failures else ""))
    return 1 if failures else 0


def _report(results) -> int:
    failures = 0
    for name, seconds, error, info in results:
        if error is None:
            print(f"ok    {seconds:5.2f}s  {name}  ({info})", flush=True)
        else:
            failures += 1
            print(f"FAIL  {seconds:5.2f}s  {name}: {error}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
