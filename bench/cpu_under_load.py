"""CPU seconds of the C++ kernels with 1 vs 2 intra-op threads while other processes keep the cores busy.

Issue 14 item 11: on a shared machine a 2-thread OpenMP region whose second thread waits for a time
slice makes the first spin at the barrier, so a small op can burn far more CPU than it computes. This
starts ``--load`` busy-loop processes (one per core given, pinned there when the OS allows), then runs
each kernel of the ``cpp`` backend over a size sweep, alternating 1 and 2 threads round by round, and
reports per call: CPU time (``time.process_time``: every thread of this process, the spin included,
with a short pause after each batch so that workers spinning after the last call are counted too),
wall time, and the ratio of 2-thread to 1-thread CPU time. The target: no case above 1.5x.

``--crossover`` instead times single calls with every region parallel (NEPENTHE_CPU_ALWAYS_PARALLEL=1)
and no extra load, and reports the fastest call at 1 and 2 threads per size: the moments the second
core was free show where splitting starts to pay (the grain sizes of csrc/cpu).

Run: python bench/cpu_under_load.py [--quick] [--csv out.csv] [--crossover] (after setup.py build_ext
--inplace). Exit status 1 when a case spends more than ``--limit`` (1.5) times the single-thread CPU time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from nepenthe.ops import backends

CPP = backends.load("cpp")
BUSY = ("import os, sys\ntry:\n    os.sched_setaffinity(0, {int(sys.argv[1])})\nexcept OSError:\n    pass\n"
        "while True:\n    pass\n")


def start_load(cores: list[int]) -> list[subprocess.Popen]:
    """One busy-loop process per core in ``cores`` (pinned there), the 'other engineers' of the machine."""
    return [subprocess.Popen([sys.executable, "-c", BUSY, str(c)]) for c in cores]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


# ----- the cases: (kernel, numel) -> a call of the backend function on prepared tensors ------------------
def _x(numel: int, dtype=torch.float32) -> torch.Tensor:
    c = 64 if numel >= 64 * 64 else 8
    return torch.randn(max(1, numel // (c * 16)), c, 16, dtype=dtype)  # [outer, C, inner] = N, C, H*W


def make_case(kernel: str, numel: int):
    if kernel in ("sign_histogram", "relu", "gelu"):
        x = _x(numel)
        hist = torch.zeros(x.shape[1], 4, dtype=torch.int64)
        if kernel == "sign_histogram":
            return lambda: CPP.sign_histogram_(hist, x, None)
        y = torch.empty_like(x)
        kind = ("relu", "relu6", "leaky_relu", "gelu").index(kernel)
        return lambda: CPP.activation_histogram_(x, y, hist, kind, 0.01, None)
    # one parameter of `numel` elements, half of it masked
    p, g = torch.randn(numel), torch.randn(numel)
    mask = torch.rand(numel) > 0.5
    if kernel == "masked_sgd":
        buf = torch.zeros(numel)
        return lambda: CPP.masked_sgd_([p], [g], [buf], [mask], 0.01, 0.9, 0.0, 5e-4, False, False, False)
    m, v = torch.zeros(numel), torch.zeros(numel)
    return lambda: CPP.masked_adamw_([p], [g], [m], [v], [], [mask], 1e-3, 0.9, 0.999, 1e-8, 1e-2, 5, False, False)


def measure(call, threads: int, seconds: float, pause: float) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call at ``threads`` threads, over batches lasting ``seconds``."""
    torch.set_num_threads(threads)
    for _ in range(3):
        call()
    time.sleep(pause)
    calls, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        call()
        calls += 1
    wall = time.perf_counter() - wall0
    time.sleep(pause)  # the CPU that workers spin away after the last call belongs to these calls
    cpu = time.process_time() - cpu0
    return cpu / calls, wall / calls


def crossover(kernels, sizes, calls: int) -> None:
    """Fastest and median single-call wall time at 1 and 2 threads, interleaved call by call."""
    for kernel in kernels:
        for numel in sizes:
            call = make_case(kernel, numel)
            times = {1: [], 2: []}
            for i in range(calls):
                for threads in ((1, 2) if i % 2 == 0 else (2, 1)):
                    torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    call()
                    times[threads].append(time.perf_counter() - t0)
            best = {t: min(v) * 1e6 for t, v in times.items()}
            med = {t: statistics.median(v) * 1e6 for t, v in times.items()}
            print(f"{kernel:15s} {numel:>9,d}  fastest 1t {best[1]:8.1f} us  2t {best[2]:8.1f} us  "
                  f"x{best[2] / best[1]:.2f}   median 1t {med[1]:8.1f} us  2t {med[2]:8.1f} us  "
                  f"x{med[2] / med[1]:.2f}", flush=True)


KERNELS = ("sign_histogram", "relu", "gelu", "masked_sgd", "masked_adamw")
SIZES = (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)


def run(kernels, sizes, rounds: int, seconds: float, pause: float) -> list[dict]:
    rows = []
    for kernel in kernels:
        for numel in sizes:
            call = make_case(kernel, numel)
            cpu = {1: [], 2: []}
            wall = {1: [], 2: []}
            for r in range(rounds):  # interleaved, alternating which goes first: load bursts hit both
                for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
                    c, w = measure(call, threads, seconds, pause)
                    cpu[threads].append(c)
                    wall[threads].append(w)
            row = {"kernel": kernel, "numel": numel,
                   "cpu_us_1t": statistics.median(cpu[1]) * 1e6, "cpu_us_2t": statistics.median(cpu[2]) * 1e6,
                   "wall_us_1t": statistics.median(wall[1]) * 1e6, "wall_us_2t": statistics.median(wall[2]) * 1e6}
            row["cpu_ratio"] = row["cpu_us_2t"] / row["cpu_us_1t"]
            row["wall_ratio"] = row["wall_us_2t"] / row["wall_us_1t"]
            rows.append(row)
            print(f"{kernel:15s} {numel:>9,d}  CPU/call 1t {row['cpu_us_1t']:9.1f} us  2t {row['cpu_us_2t']:9.1f} us  "
                  f"x{row['cpu_ratio']:.2f}   wall 1t {row['wall_us_1t']:9.1f} us  2t {row['wall_us_2t']:9.1f} us "
                  f"x{row['wall_ratio']:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter batches")
    ap.add_argument("--load", type=int, nargs="*", default=None,
                    help="cores to keep busy (default: the last core); --load with no value: no load")
    ap.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--limit", type=float, default=1.5, help="largest allowed 2-thread / 1-thread CPU ratio")
    ap.add_argument("--csv", help="write the rows here")
    ap.add_argument("--crossover", action="store_true", help="time single calls, every region parallel")
    args = ap.parse_args(argv)
    if args.crossover:
        os.environ["NEPENTHE_CPU_ALWAYS_PARALLEL"] = "1"  # read at the first parallel loop of the extension
        print(f"# crossover {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, loadavg "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        crossover(args.kernels, args.sizes, 100 if args.quick else 400)
        return 0
    rounds, seconds = (3, 0.15) if args.quick else (7, 0.3)
    cores = sorted(os.sched_getaffinity(0))
    load_cores = [cores[-1]] if args.load is None else args.load
    before = torch.get_num_threads()
    print(f"# {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  {platform.processor()} "
          f"{len(cores)} cores, load on {load_cores}, loadavg {os.getloadavg()[0]:.2f}, torch {torch.__version__}, "
          f"python {platform.python_version()}, {rounds} rounds x {seconds}s", flush=True)
    procs = start_load(load_cores)
    try:
        time.sleep(0.2)
        rows = run(args.kernels, args.sizes, rounds, seconds, pause=0.02)
    finally:
        stop_load(procs)
        torch.set_num_threads(before)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    worst = max(rows, key=lambda r: r["cpu_ratio"])
    print(f"# worst: {worst['kernel']} {worst['numel']:,} elements, 2 threads spend x{worst['cpu_ratio']:.2f} the "
          f"1-thread CPU time (limit x{args.limit})")
    return 0 if worst["cpu_ratio"] <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
