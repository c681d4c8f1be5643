"""Reports of a run: environment facts, the per-iteration table, and the entropy plot."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__


def environment(device: torch.device | str = "cpu") -> dict:
    """Versions and device, for every report and benchmark record."""
    import numpy

    device = torch.device(device)
    info = {
        "nepenthe": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def iteration_table(records: Sequence[dict], max_layers: int = 12) -> str:
    """A fixed-width text table: one row per iteration, one entropy column (L0, L1, ...) per rectifier
    layer, and a legend naming the layers."""
    if not records:
        return ""
    layers = list(records[0]["layer_entropy"])
    shown = layers[:max_layers]
    columns = " ".join(f"{'L' + str(i):>6}" for i in range(len(shown)))
    head = f"{'it':>3} {'acc%':>6} {'sparsity':>8} {'H=0':>5} | {columns}"
    lines = [head, "-" * len(head)]
    for r in records:
        ent = r["layer_entropy"]
        cells = " ".join(f"{ent[n]:6.3f}" if n in ent else f"{'-':>6}" for n in shown)
        lines.append(f"{r['iteration']:>3} {r['accuracy']:6.2f} {r['sparsity']:8.3f} "
                     f"{len(r['zero_entropy_layers']):>2}/{len(ent):<2} | {cells}")
    legend = ", ".join(f"L{i} {n}" for i, n in enumerate(shown))
    lines.append(f"layer entropy in bits; {legend}" + (f" (+{len(layers) - max_layers} more in report.json)"
                                                        if len(layers) > max_layers else ""))
    return "\n".join(lines)


def plot_entropy(records: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Entropy of every rectifier layer per iteration as a heat map; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = list(records[0]["layer_entropy"])
    grid = [[r["layer_entropy"].get(n, float("nan")) for r in records] for n in layers]
    fig_h = max(3.0, 0.28 * len(layers) + 1.5)
    fig, (ax_map, ax_acc) = plt.subplots(1, 2, figsize=(11, fig_h), gridspec_kw={"width_ratios": [3, 2]})
    image = ax_map.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax_map.set_yticks(range(len(layers)), layers, fontsize=7)
    ax_map.set_xticks(range(len(records)), [str(r["iteration"]) for r in records])
    ax_map.set_xlabel("iteration")
    ax_map.set_title("layer entropy (bits); 0 = linearizable")
    fig.colorbar(image, ax=ax_map, fraction=0.04)
    its = [r["iteration"] for r in records]
    ax_acc.plot(its, [r["accuracy"] for r in records], "o-", label="accuracy %")
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel("validation accuracy %")
    twin = ax_acc.twinx()
    twin.plot(its, [len(r["zero_entropy_layers"]) for r in records], "s--", color="tab:red", label="H=0 layers")
    twin.set_ylabel("zero-entropy layers", color="tab:red")
    ax_acc.set_title("accuracy and collapsed layers")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
