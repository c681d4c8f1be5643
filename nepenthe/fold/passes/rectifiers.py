"""Pass 2: zero-entropy rectifiers become the per-channel affine map they compute on the data
(absorbed into the producer where it feeds only them); always-OFF neurons of rectifiers
that stay are zeroed at their producer. Also the approximation error of GELU/SiLU sites."""

from __future__ import annotations

import torch
import torch.fx as fx

from ...activations import BATCHNORM_MODULES, Rectifier
from ...entropy import EntropyStats
from ...graph import Site
from .. import algebra, modules
from .._fx import is_inplace, model_dtype, module_of, only_user, same_channel_dim
from ..report import FoldReport, skip

__all__ = ["approximation_errors", "dead_neuron_producer", "linearize_rectifiers", "region_affine"]


def region_affine(rect: Rectifier, off: torch.Tensor, sat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (slope, offset) of a linearized rectifier."""
    regions = rect.region_affine()
    slope = torch.ones(off.shape[0], dtype=torch.float64)
    offset = torch.zeros(off.shape[0], dtype=torch.float64)
    slope[off] = regions["off"][0]
    if "sat" in regions:
        slope[sat] = regions["sat"][0]
        offset[sat] = regions["sat"][1]
    return slope, offset


def linearize_rectifiers(gm: fx.GraphModule, sites: list[Site], stats: EntropyStats, report: FoldReport,
                         approximate: bool, strict: bool) -> None:
    report.rectifier_layers_total = len(sites)
    for site in sites:
        name, node, rect = site.name, site.node, site.rectifier
        if name not in stats.histogram:
            skip(report, strict, name, "no statistics for this call site (not reached by the calibration data)")
            continue
        off = stats.always_off[name].cpu()
        if not stats.linearizable(name):
            _zero_dead_neurons(gm, node, rect, off, stats.sites[name].channel_dim)
            continue
        if not rect.exact and not approximate:
            skip(report, strict, name, f"{rect.kind} is only approximately linear on each side of 0; pass "
                                        "approximate=True to replace it (its error is then reported)")
            continue
        if is_inplace(gm, node) and len(node.args[0].users) > 1:
            skip(report, strict, name, "an inplace activation whose input is also used elsewhere")
            continue
        slope, offset = region_affine(rect, off, stats.always_saturated[name].cpu())
        channel_dim = stats.sites[name].channel_dim
        producer = node.args[0]
        prod_module = module_of(gm, producer)
        if (algebra.is_foldable(prod_module) and only_user(producer) is node
                and same_channel_dim(prod_module, channel_dim)
                and prod_module.weight.shape[0] == slope.numel()):
            algebra.scale_output_channels_(prod_module, slope, offset)
            node.replace_all_uses_with(producer)
        else:
            replacement = producer
            if not (bool((slope == 1).all()) and bool((offset == 0).all())):
                dtype = prod_module.weight.dtype if prod_module is not None and hasattr(prod_module, "weight") \
                    else model_dtype(gm)
                target = f"{name.replace('.', '_').replace('#', '_').replace('()', '')}_affine"
                gm.add_submodule(target, modules.ChannelAffine(slope.to(dtype), offset.to(dtype), channel_dim))
                with gm.graph.inserting_after(node):
                    replacement = gm.graph.call_module(target, (producer,))
            node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        report.removed.append(name)
        if not rect.exact:
            report.approximated.append(name)
    report.rectifier_layers_removed = len(report.removed)


def dead_neuron_producer(gm: fx.GraphModule, node: fx.Node, channels: int, channel_dim) -> fx.Node | None:
    """The Conv/Linear whose rows can absorb zeroing the always-OFF neurons of the ReLU at ``node``
    (it feeds only that ReLU, possibly through a BatchNorm that folding fuses into it), or None:
    then the ReLU stays as it is (``preview.linearized`` asks the same question)."""
    producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    m = module_of(gm, producer)
    if isinstance(m, BATCHNORM_MODULES) and only_user(producer) is node and m.track_running_stats:
        inner = producer.args[0] if producer.args and isinstance(producer.args[0], fx.Node) else None
        if inner is not None and only_user(inner) is producer:
            producer, node, m = inner, producer, module_of(gm, inner)
    if (algebra.is_foldable(m) and only_user(producer) is node and m.weight.shape[0] == channels
            and same_channel_dim(m, channel_dim)):
        return producer
    return None


def _zero_dead_neurons(gm: fx.GraphModule, node: fx.Node, rect: Rectifier, off: torch.Tensor, channel_dim) -> None:
    """Always-OFF neurons of a ReLU/ReLU6 that stays output 0 on the data: make their input 0 too,
    so the constant-channel pass can delete them."""
    if not (rect.exact and rect.off_slope == 0.0) or not bool(off.any()):
        return
    producer = dead_neuron_producer(gm, node, off.numel(), channel_dim)
    if producer is not None:
        keep = (~off).to(torch.float64)
        algebra.scale_output_channels_(module_of(gm, producer), keep, torch.zeros_like(keep))


def approximation_errors(gm: fx.GraphModule, sites: list[Site], stats: EntropyStats, args: tuple) -> dict:
    """For each GELU/SiLU/Hardswish about to be linearized: how far the linear map is from the
    activation on the example input (the replacement is approximate by nature; docs/method.md §4.4)."""
    chosen = [s for s in sites if not s.rectifier.exact and s.name in stats.histogram and stats.linearizable(s.name)]
    wanted = {s.node.args[0] for s in chosen if s.node.args and isinstance(s.node.args[0], fx.Node)}
    if not wanted:
        return {}
    captured: dict[fx.Node, torch.Tensor] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted and isinstance(out, torch.Tensor):
                captured[n] = out.detach().to(torch.float64, copy=True)  # a copy: an inplace activation follows
            return out

    _Capture(gm).run(*args)
    errors = {}
    for site in chosen:
        z = captured.get(site.node.args[0])
        if z is None or z.numel() == 0:
            continue
        slope, offset = region_affine(site.rectifier, stats.always_off[site.name].cpu(),
                                       stats.always_saturated[site.name].cpu())
        dim = stats.sites[site.name].channel_dim % z.dim()
        shape = [1] * z.dim()
        shape[dim] = -1
        phi = site.rectifier.apply(z)
        err = (phi - (z * slope.to(z.device).view(shape) + offset.to(z.device).view(shape))).abs()
        scale = float(phi.abs().max())
        errors[site.name] = {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
                             "max_rel": float(err.max()) / scale if scale > 0 else float(err.max())}
    return errors
