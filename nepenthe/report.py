"""Reports of a run: environment facts, the per-iteration table, and the entropy plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["entropy_heatmap", "iteration_table", "new_figure", "plot_entropy", "save_figure"]


def iteration_table(records: Sequence[dict], max_layers: int = 12) -> str:
    """A fixed-width text table: one row per iteration, one entropy column (L0, L1, ...) per rectifier
    layer, and a legend naming the layers."""
    if not records:
        return ""
    layers = list(records[0]["layer_entropy"])
    shown = layers[:max_layers]
    columns = " ".join(f"{'L' + str(i):>6}" for i in range(len(shown)))
    head = f"{'it':>3} {'acc%':>6} {'sparsity':>8} {'zeta':>6} {'back':>4} {'cap':>3} {'H=0':>5} | {columns}"
    lines = [head, "-" * len(head)]
    for r in records:
        ent = r["layer_entropy"]
        cells = " ".join(f"{ent[n]:6.3f}" if n in ent else f"{'-':>6}" for n in shown)
        acc = f"{r['accuracy']:6.2f}" if r.get("accuracy") is not None else f"{'nan':>6}"
        zeta = f"{r['zeta']:6.3f}" if r.get("zeta") else f"{'-':>6}"
        mark = "" if r.get("within_tolerance", True) else "  x " + (r.get("failure") or "below tolerance")
        lines.append(f"{r['iteration']:>3} {acc} {r['sparsity']:8.3f} {zeta} {len(r.get('backoffs', [])):>4} "
                     f"{len(r.get('capped', {})):>3} {len(r['zero_entropy_layers']):>2}/{len(ent):<2} | {cells}{mark}")
    legend = ", ".join(f"L{i} {n}" for i, n in enumerate(shown))
    lines.append("zeta: pruning fraction of the kept step; back: failed attempts retried with a smaller step; "
                 "cap: layers held back by a cap")
    lines.append(f"layer entropy in bits; {legend}" + (f" (+{len(layers) - max_layers} more in report.json)"
                                                        if len(layers) > max_layers else ""))
    return "\n".join(lines)


def new_figure(**kwargs):
    """A matplotlib Figure drawn off-screen (Agg) without pyplot, so the user's backend and open
    figures are left alone; None when matplotlib is missing (the ``plot`` extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_entropy(records: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Entropy of every rectifier layer per iteration as a heat map, beside accuracy and collapsed
    layers; None when matplotlib is missing."""
    layers = list(records[0]["layer_entropy"])
    fig = new_figure(figsize=(11, max(3.0, 0.28 * len(layers) + 1.5)))
    if fig is None:
        return None
    ax_map, ax_acc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    entropy_heatmap(ax_map, records)
    its = [r["iteration"] for r in records]
    ax_acc.plot(its, [math.nan if r["accuracy"] is None else r["accuracy"] for r in records], "o-",
                label="accuracy %")
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel("validation accuracy %")
    twin = ax_acc.twinx()
    twin.plot(its, [len(r["zero_entropy_layers"]) for r in records], "s--", color="tab:red", label="H=0 layers")
    twin.set_ylabel("zero-entropy layers", color="tab:red")
    ax_acc.set_title("accuracy and collapsed layers")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def entropy_heatmap(ax, records: Sequence[dict], title: str = "layer entropy (bits); 0 = linearizable") -> None:
    """Layers × iterations heat map of the layer entropies of ``records`` on a matplotlib axis."""
    layers = list(records[0]["layer_entropy"])
    grid = [[r["layer_entropy"].get(n, math.nan) for r in records] for n in layers]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xticks(range(len(records)), [str(r["iteration"]) for r in records])
    ax.set_xlabel("iteration")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.04)
