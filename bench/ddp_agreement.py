"""What the per-step agreement of ``nepenthe.train`` costs under DDP (issue 15 item 4).

    .venv/bin/python bench/ddp_agreement.py [--world 2] [--steps 300] [--batch 128] [--rounds 3]

``nepenthe.train`` has every rank decide together, once per step and before the backward, whether
it goes on (``nepenthe.distributed.AgreedBatches``: its forward's error or NaN loss, its next
batch's fetch), so that a rank failing alone in the middle of an epoch never leaves the others
waiting in DDP's collectives. This times a DDP training step of the package's ``ResidualMLP`` (64
inputs, gloo on the CPU, one thread per rank) with and without that one all-reduce of a few int32
(and its ``tolist``), alternating in rounds, and prints the best time per step of each and their
ratio. Runs ``--world`` local processes through ``torch.multiprocessing``.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


def _rank(rank: int, world: int, init: str, args, out: str) -> None:
    from nepenthe.models import ResidualMLP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(ResidualMLP(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(args.batch, 64), torch.randint(0, 10, (args.batch,))

    def step(agree: bool) -> None:
        loss = F.cross_entropy(model(x), y)
        if agree:  # what AgreedBatches.advance exchanges: step failed, fetch failed, ended, NaN loss
            flags = torch.tensor([0, 0, 0, int(not torch.isfinite(loss))], dtype=torch.int32)
            dist.all_reduce(flags)
            flags.tolist()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.rounds):
        for agree in (False, True):
            for _ in range(20):
                step(agree)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(agree)
            dist.barrier()
            best[agree] = min(best[agree], (time.perf_counter() - start) / args.steps * 1e3)
    if rank == 0:
        Path(out).write_text(f"{best[False]:.3f} {best[True]:.3f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.spawn(_rank, args=(args.world, f"file://{tmp}/rendezvous", args, out), nprocs=args.world)
        plain, agreed = (float(v) for v in Path(out).read_text().split())
    print(f"DDP step ({args.world} gloo ranks, ResidualMLP, batch {args.batch}): {plain:.3f} ms without the "
          f"agreement, {agreed:.3f} ms with it: {agreed / plain:.3f}x, {(agreed - plain) * 1e3:.0f} us per step")


if __name__ == "__main__":
    main()
