"""Exact algebra on linear modules: the building blocks of folding (docs/method.md §4).

Every function returns new modules (or edits one in place, as its name says) and computes in
float64 before casting back, so that a chain of merges adds no more rounding than one matmul.
Only Linear and Conv1d/Conv2d with zero padding mode and dilation 1 are handled here; callers
check :func:`is_plain_conv` first. Grouped (and depthwise) convs are composed through their dense,
block-diagonal weight, so a merge involving one gives a dense conv: the fold planner decides from
measured latency whether that is worth it.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn as nn

__all__ = ["COMPOSED_CONVS", "LINEAR_MODULES", "absorb_constant_inputs_", "absorb_input_offset_",
           "absorbs_input_offset", "add_identity", "add_to_bias_", "branches_blocker", "compose_kernels64",
           "conv_merge_blocker", "dense_weight64", "identity_blocker", "is_composed_conv", "is_foldable",
           "is_plain_conv", "LinearLike", "merge_branches", "merge_conv_conv", "merge_linear_linear", "output_size",
           "scale_output_channels_", "select_input_channels", "select_output_channels"]

LinearLike = nn.Linear | nn.Conv1d | nn.Conv2d
LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what a merge candidate can be made of


def is_plain_conv(m: nn.Module) -> bool:
    """Conv1d/2d without dilation or non-zero padding modes (what the algebra supports)."""
    return (isinstance(m, (nn.Conv1d, nn.Conv2d)) and all(d == 1 for d in m.dilation)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def dense_weight64(m: LinearLike) -> torch.Tensor:
    """The weight as float64, a grouped conv's expanded to its dense block-diagonal equivalent."""
    w = m.weight.detach().to(torch.float64)
    groups = getattr(m, "groups", 1)
    if groups == 1:
        return w
    out_per, in_per = w.shape[0] // groups, w.shape[1]
    dense = w.new_zeros((w.shape[0], in_per * groups) + tuple(w.shape[2:]))
    for g in range(groups):
        dense[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = w[g * out_per:(g + 1) * out_per]
    return dense


def is_foldable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_plain_conv(m)


# Conv-like modules computing ``conv(x, weight, bias, stride, padding, groups) + r(x)`` where r does
# not depend on ``weight``/``bias`` (modules.BorderCorrectedConv registers itself here). Adding a
# skip or a parallel branch only changes ``weight`` and ``bias``, so those merges accept them;
# composing them with another conv does not (they are never "foldable").
COMPOSED_CONVS: list[type] = []


def is_composed_conv(m: nn.Module) -> bool:
    return isinstance(m, tuple(COMPOSED_CONVS))


def _with_weights(m: nn.Module, weight: torch.Tensor, bias: torch.Tensor, **conv_overrides) -> nn.Module:
    """A copy of conv ``m`` (plain or composed) with a new kernel and bias."""
    if is_composed_conv(m):
        new = copy.deepcopy(m)
        if conv_overrides.get("kernel_size", new.kernel_size) != new.kernel_size \
                or conv_overrides.get("padding", new.padding) != new.padding:
            raise ValueError("a composed conv keeps its kernel size and padding")
        return _set(new, weight, bias)
    kwargs = {"kernel_size": tuple(weight.shape[2:]), **conv_overrides}
    return _set(_like(m, m.in_channels, m.out_channels, **kwargs), weight, bias)


def _bias64(m: LinearLike) -> torch.Tensor:
    w = m.weight
    return (m.bias.detach().to(torch.float64) if m.bias is not None
            else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device))


def _set(m: LinearLike, weight: torch.Tensor, bias: torch.Tensor) -> LinearLike:
    """Write float64 results back with the module's dtype, creating a bias if needed."""
    ref = m.weight
    m.weight = nn.Parameter(weight.to(ref.dtype).contiguous(), requires_grad=ref.requires_grad)
    m.bias = nn.Parameter(bias.to(ref.dtype).contiguous(), requires_grad=ref.requires_grad)
    return m


def _like(m: LinearLike, in_ch: int, out_ch: int, **conv_overrides) -> LinearLike:
    """An empty module of the same kind with new channel counts (weights set by the caller)."""
    device, dtype = m.weight.device, m.weight.dtype
    if isinstance(m, nn.Linear):
        return nn.Linear(in_ch, out_ch, bias=True, device=device, dtype=dtype)
    kwargs = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding)
    kwargs.update(conv_overrides)
    return type(m)(in_ch, out_ch, bias=True, device=device, dtype=dtype, **kwargs)


@torch.no_grad()
def scale_output_channels_(m: LinearLike, slope: torch.Tensor, offset: torch.Tensor) -> LinearLike:
    """y_c -> slope_c · y_c + offset_c, absorbed into the module's rows and bias (in place)."""
    w = m.weight.detach().to(torch.float64)
    s = slope.to(torch.float64).to(w.device)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return _set(m, w * s.view(shape), s * _bias64(m) + offset.to(torch.float64).to(w.device))


@torch.no_grad()
def select_output_channels(m: LinearLike, keep: torch.Tensor) -> LinearLike:
    """A copy of ``m`` (not grouped) that computes only the output channels where ``keep`` is True."""
    idx = keep.nonzero().squeeze(1).to(m.weight.device)
    new = _like(m, m.weight.shape[1], len(idx))
    return _set(new, m.weight.detach().to(torch.float64)[idx], _bias64(m)[idx])


@torch.no_grad()
def select_input_channels(m: LinearLike, keep: torch.Tensor) -> LinearLike:
    """A copy of ``m`` (not grouped) that reads only the input channels where ``keep`` is True."""
    idx = keep.nonzero().squeeze(1).to(m.weight.device)
    new = _like(m, len(idx), m.weight.shape[0])
    return _set(new, m.weight.detach().to(torch.float64)[:, idx], _bias64(m))


@torch.no_grad()
def absorb_constant_inputs_(m: LinearLike, values: torch.Tensor, channels: torch.Tensor) -> LinearLike:
    """Fold constant input channels into the bias: b += Σ_c Σ_kernel W[:, c] · value_c (in place).

    Exact for Linear and for convs without padding (every output position sees the constant
    through the whole kernel); the caller must not use it on a padded conv.
    """
    w = m.weight.detach().to(torch.float64)
    idx = channels.to(w.device)
    contribution = w[:, idx].flatten(2).sum(2) if w.dim() > 2 else w[:, idx]
    bias = _bias64(m) + contribution @ values.to(torch.float64).to(w.device)
    return _set(m, w, bias)


@torch.no_grad()
def merge_linear_linear(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """second(first(x)) as one Linear: W = W2 W1, b = W2 b1 + b2."""
    w1, w2 = first.weight.detach().to(torch.float64), second.weight.detach().to(torch.float64)
    new = _like(second, first.in_features, second.out_features)
    return _set(new, w2 @ w1, w2 @ _bias64(first) + _bias64(second))


def conv_merge_blocker(first: nn.Module, second: nn.Module) -> str | None:
    """Why second∘first cannot be one exact conv, or None when it can."""
    if not (is_plain_conv(first) and is_plain_conv(second)) or type(first) is not type(second):
        return "only Conv1d/Conv2d pairs of the same dimension, without dilation or padding modes, are merged"
    if any(p != 0 for p in second.padding):
        # The second conv pads the first one's output with zeros, but a merged kernel would see
        # the first conv's (non-zero) response there: the borders would differ.
        return "the second conv zero-pads, so a merged kernel would be wrong at the borders"
    return None


@torch.no_grad()
def compose_kernels64(w2: torch.Tensor, w1: torch.Tensor, stride, groups: int = 1) -> torch.Tensor:
    """``F.conv_transpose{1,2}d(w2, w1, stride=stride, groups=groups)`` for float64 kernels:
    K[n, c, s·v + w] = Σ_m W2[n, m, v] · W1[m, c, w] (m within c's group).

    Computed as one batched matmul per tap v of ``w2`` and deliberately not by the transposed conv
    itself: float64 convolutions take a slow generic path on the CPU (3 s against 0.3 s for
    composing two 512-channel 3×3 kernels on 2 cores), and every merge candidate is composed.
    """
    n, m = w2.shape[:2]
    k2, k1 = tuple(w2.shape[2:]), tuple(w1.shape[2:])
    c_per = w1.shape[1]
    stride = tuple(stride)
    size = tuple((a - 1) * s + b for a, b, s in zip(k2, k1, stride))
    out = w2.new_zeros((n, groups * c_per) + size)
    # per group: (g, M/g, C/g · k1) weights of the first conv
    right = w1.reshape(groups, m // groups, c_per * math.prod(k1))
    for tap in itertools.product(*(range(k) for k in k2)):
        left = w2[(slice(None), slice(None)) + tap].reshape(n, groups, m // groups).transpose(0, 1)  # (g, N, M/g)
        block = torch.bmm(left, right).transpose(0, 1).reshape((n, groups * c_per) + k1)
        window = tuple(slice(v * s, v * s + k) for v, s, k in zip(tap, stride, k1))
        out[(slice(None), slice(None)) + window] += block
    return out


def merge_conv_conv(first: nn.Conv1d | nn.Conv2d, second: nn.Conv1d | nn.Conv2d) -> nn.Conv1d | nn.Conv2d:
    """second(first(x)) as one conv with the full composed kernel (k1 + s1·(k2 − 1) wide).

    K[o, i, q] = Σ_m Σ_{s1·v + w = q} W2[o, m, v] · W1[m, i, w], which is exactly a transposed
    convolution of W2 (as a batch of O images with M channels) by W1 with stride s1. Stride
    composes as s1·s2, padding is the first conv's (the second has none).
    """
    reason = conv_merge_blocker(first, second)
    if reason:
        raise ValueError(reason)
    w1, w2 = dense_weight64(first), dense_weight64(second)
    kernel = compose_kernels64(w2, w1, first.stride)
    bias = _bias64(second) + w2.flatten(2).sum(2) @ _bias64(first)
    stride = tuple(a * b for a, b in zip(first.stride, second.stride))
    new = _like(first, first.in_channels, second.out_channels, kernel_size=tuple(kernel.shape[2:]), stride=stride,
                padding=first.padding)
    return _set(new, kernel, bias)


def identity_blocker(m: nn.Module) -> str | None:
    """Why ``x + m(x)`` cannot be folded into ``m``, or None when it can."""
    if isinstance(m, nn.Linear):
        return None if m.in_features == m.out_features else "the skip adds a vector of another width"
    if not (is_plain_conv(m) or is_composed_conv(m)) or m.groups != 1:
        return "only plain convs (without groups) and Linear absorb a skip connection"
    if m.in_channels != m.out_channels or any(s != 1 for s in m.stride):
        return "the skip path changes shape (channels or stride)"
    if any(k % 2 == 0 or p != k // 2 for k, p in zip(m.kernel_size, m.padding)):
        return "the conv does not keep the spatial size centred (odd kernel, padding k//2)"
    return None


@torch.no_grad()
def add_identity(m: nn.Module) -> nn.Module:
    """A copy of ``m`` computing x + m(x): W + I, or a centred delta kernel added for convs."""
    reason = identity_blocker(m)
    if reason:
        raise ValueError(reason)
    w = m.weight.detach().to(torch.float64).clone()
    channels = torch.arange(w.shape[0], device=w.device)
    centre = tuple(k // 2 for k in w.shape[2:])
    w[(channels, channels) + centre] += 1.0
    if isinstance(m, nn.Linear):
        return _set(_like(m, w.shape[1], w.shape[0]), w, _bias64(m))
    return _with_weights(m, w, _bias64(m))


def _branch_offsets(a: nn.Module, b: nn.Module) -> list[tuple[int, int]] | None:
    """Per spatial dim, where a's and b's kernels sit in the summed kernel (None: they cannot)."""
    offsets = []
    for ka, pa, kb, pb in zip(a.kernel_size, a.padding, b.kernel_size, b.padding):
        if 2 * pa - ka != 2 * pb - kb:  # output sizes would differ for some input size
            return None
        top = max(pa, pb)
        offsets.append((top - pa, top - pb))
    return offsets


def _branch_layout(a: nn.Module, b: nn.Module):
    """(a, b, offsets, kernel size, padding) of ``a(x) + b(x)`` as one conv whose kernel is a's
    size or larger (a composed conv always comes first: its kernel cannot change), or a reason."""
    convs = [is_plain_conv(m) or is_composed_conv(m) for m in (a, b)]
    if not all(convs) or len(a.kernel_size) != len(b.kernel_size):
        return "only two Linear or two convs of the same dimension are summed into one op"
    if is_composed_conv(a) and is_composed_conv(b):
        return "both branches are composed convs with their own border corrections"
    if is_composed_conv(b):
        a, b = b, a
    if (a.in_channels, a.out_channels) != (b.in_channels, b.out_channels) or a.stride != b.stride:
        return "the two branches differ in channels or stride"
    offsets = _branch_offsets(a, b)
    if offsets is None:
        return "the two branches' kernels are not aligned on the same output grid (kernel/padding)"
    size = tuple(max(oa + ka, ob + kb) for (oa, ob), ka, kb in zip(offsets, a.kernel_size, b.kernel_size))
    padding = tuple(max(pa, pb) for pa, pb in zip(a.padding, b.padding))
    if is_composed_conv(a) and (size != tuple(a.kernel_size) or padding != tuple(a.padding) or a.groups != 1):
        return "the other branch's kernel does not fit inside the composed conv's"
    return a, b, offsets, size, padding


def branches_blocker(a: nn.Module, b: nn.Module) -> str | None:
    """Why ``a(x) + b(x)`` cannot be one op, or None when it can."""
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        if (a.in_features, a.out_features) != (b.in_features, b.out_features):
            return "the two branches have different widths"
        return None
    layout = _branch_layout(a, b)
    return layout if isinstance(layout, str) else None


@torch.no_grad()
def merge_branches(a: nn.Module, b: nn.Module) -> nn.Module:
    """One op computing ``a(x) + b(x)``: the weights summed, the smaller conv kernel placed where
    its padding puts it in the larger one (e.g. a 1×1 projection at the centre of a 3×3)."""
    reason = branches_blocker(a, b)
    if reason:
        raise ValueError(reason)
    if isinstance(a, nn.Linear):
        new = _like(a, a.in_features, a.out_features)
        return _set(new, dense_weight64(a) + dense_weight64(b), _bias64(a) + _bias64(b))
    a, b, offsets, size, padding = _branch_layout(a, b)
    wa, wb = dense_weight64(a), dense_weight64(b)
    kernel = wa.new_zeros(wa.shape[:2] + size)
    for w, which in ((wa, 0), (wb, 1)):
        index = (slice(None), slice(None)) + tuple(slice(o[which], o[which] + k)
                                                   for o, k in zip(offsets, w.shape[2:]))
        kernel[index] += w
    return _with_weights(a, kernel, _bias64(a) + _bias64(b), stride=a.stride, padding=padding)


@torch.no_grad()
def add_to_bias_(m: LinearLike, values: torch.Tensor) -> LinearLike:
    """y -> y + values (one constant per output channel), absorbed into the bias (in place)."""
    return _set(m, m.weight.detach().to(torch.float64), _bias64(m) + values.to(torch.float64).to(m.weight.device))


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil_mode: bool = False) -> int:
    """Length of a conv/pool output along one dim (torch's formula)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    return (-(-span // stride) if ceil_mode else span // stride) + 1


def absorbs_input_offset(m: nn.Module, channels: int, channel_dim: int) -> bool:
    """Whether ``m(x + c)`` (c one constant per input channel) equals ``m(x)`` with a new bias: a
    Linear (channels on the last dim), or a plain conv without padding (channels on dim 1: every
    output position sees the constant through the whole kernel)."""
    if isinstance(m, nn.Linear):
        return channel_dim == -1 and m.in_features == channels
    return (is_plain_conv(m) and channel_dim == 1 and m.in_channels == channels
            and all(p == 0 for p in m.padding))


@torch.no_grad()
def absorb_input_offset_(m: LinearLike, offset: torch.Tensor) -> LinearLike:
    """``m(x + c)`` -> ``m(x)`` with b += Σ_kernel W · c (in place; check :func:`absorbs_input_offset`)."""
    w = dense_weight64(m)
    c = offset.to(torch.float64).to(w.device)
    contribution = (w.flatten(2).sum(2) if w.dim() > 2 else w) @ c
    return _set(m, m.weight.detach().to(torch.float64), _bias64(m) + contribution)
