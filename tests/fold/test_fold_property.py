"""Property-based exactness tests of ``nepenthe.fold`` (issue 4, item 2).

Random networks (1d / 2d convolution stacks and MLPs on vectors or tokens: kernel sizes 1–5,
strides 1–2, paddings 0..k (rarely "same"/"valid", dilation 2, circular/reflect), groups 1 / 2 /
depthwise, BatchNorm with random statistics, ReLU / ReLU6 / LeakyReLU(0.1) / GELU as modules,
functionals or methods, inplace or not; conv+BN+act, residual (identity or 1×1 projection skip,
``+`` / ``torch.add`` / ``.add``), BasicBlock (shared ReLU: ``relu`` / ``relu#1``), inverted residual,
parallel branches ``a(x) + b(x)``, pre-activation ``conv(act(x)) + x``, bare activations, pools,
Identity / Dropout, transformer MLP (Linear → GELU → Dropout → Linear [+ x]), pooled / flattened
heads; inputs of 1–13 (2d) or 1–20 (1d) positions) get random *forced* neuron states
(``forced_stats``: whole layers ON / OFF / saturated, per-neuron mixes, layers left mixed) and
sometimes emptied layers (``empty_layers``). The oracle is ``linearized(model, stats)``: the model
with each rectifier replaced by what the statistics say it computes. Folding applies exactly those
maps and only merges linear ops, so on ANY input (not only calibration data; also other spatial
sizes where the net allows them) it must equal the oracle:

* fp32: max|folded − oracle| / max|oracle| ≤ 1e-5,
* fp64: the same ≤ 1e-10 (rounding is then far below any algebra mistake),

and its report must account for every linearizable call site: removed, or skipped with a non-empty
reason. Folding may leave a call site alone (the oracle then keeps it too), never produce a wrong
model; a crash is a failure as well.

A failing example prints its ``case`` dict (spec, seed, states, emptied layers, approximate);
``run_case(case, dtype)`` replays it (``KNOWN_CASES`` holds the minimal ones found so far).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import nepenthe
from nepenthe.fold.preview import NeuronState, empty_layers, forced_stats, linearized
from nepenthe.graph import find_sites

MIXED, OFF, ON, SAT = NeuronState.MIXED, NeuronState.OFF, NeuronState.ON, NeuronState.SAT

pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same'"),  # torch's note on even 'same' kernels
              pytest.mark.usefixtures("one_thread")]  # tiny ops (tests/conftest.py)

FP32_TOL = 1e-5
FP64_TOL = 1e-10
MAX_SIZE = 16  # spatial extent cap, keeps the examples fast
MAX_CH = 6
LEAKY_SLOPE = 0.1  # not a binary fraction: a slope rounded to fp32 shows in the fp64 check

# Derandomized (the same examples in every run, CI is reproducible) and no shrinking by default: a
# failing example is printed as a ``case`` dict that ``run_case`` replays, and shrinking several
# distinct bugs can take minutes. NEPENTHE_SHRINK=1 turns shrinking on to get minimal examples.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
if os.environ.get("NEPENTHE_SHRINK"):
    _PHASES.append(Phase.shrink)
PROPERTY = dict(deadline=None, derandomize=True, database=None, print_blob=False, phases=_PHASES,
                report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


# --------------------------------------------------------------------------------------------------
# Folding and comparing
# --------------------------------------------------------------------------------------------------


def fold_all(model: nn.Module, stats, x, *, approximate: bool = False):
    """``fold`` merging every exact candidate (``planner="all"``)."""
    return nepenthe.fold(model, stats, x, verify=False, approximate=approximate, planner="all")


forced = forced_stats


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-3) -> float:
    """max|out − ref| / max|ref|, the denominator floored (an all-zero reference compares absolutely)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"folded output shape {tuple(out.shape)} != oracle {tuple(ref.shape)}"
    assert bool(torch.isfinite(out).all()), "folded output is not finite"
    if ref.numel() == 0:
        return 0.0
    return float((out - ref).abs().max()) / max(float(ref.abs().max()), floor)


def state_dict_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Models from specs (plain dicts / lists: hypothesis prints and shrinks them readably)
# --------------------------------------------------------------------------------------------------


def act_module(a: dict) -> nn.Module:
    kind = a["kind"]
    if kind == "relu":
        return nn.ReLU(inplace=a["inplace"])
    if kind == "relu6":
        return nn.ReLU6(inplace=a["inplace"])
    if kind == "leaky":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=a["inplace"])
    if kind == "gelu":
        return nn.GELU(approximate=a["approx"])
    raise AssertionError(kind)


def add_act(owner: nn.Module, attr: str, a: dict | None) -> None:
    """Register the activation module ``attr`` of ``owner`` when the spec wants a module call."""
    if a is not None and a["style"] == "module":
        setattr(owner, attr, act_module(a))


def apply_act(owner: nn.Module, attr: str, a: dict | None, x):
    """The activation of spec ``a``: the module ``owner.attr`` or a functional / method call."""
    if a is None:
        return x
    style, kind, inplace = a["style"], a["kind"], a["inplace"]
    if style == "module":
        return getattr(owner, attr)(x)
    if kind == "relu":
        if style == "method":
            return x.relu_() if inplace else x.relu()
        if style == "torch":
            return torch.relu_(x) if inplace else torch.relu(x)
        return F.relu(x, inplace=inplace)
    if kind == "relu6":
        return F.relu6(x, inplace=inplace)
    if kind == "leaky":
        return F.leaky_relu(x, negative_slope=LEAKY_SLOPE, inplace=inplace)
    if kind == "gelu":
        return F.gelu(x, approximate=a["approx"])
    raise AssertionError(kind)


def make_conv(c: dict, dim: int) -> nn.Module:
    cls = nn.Conv1d if dim == 1 else nn.Conv2d
    return cls(c["cin"], c["cout"], c["k"], stride=c["s"], padding=c["p"], dilation=c["d"], groups=c["g"],
               bias=c["bias"], padding_mode=c["pm"])


def make_bn(channels: int, dim: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if dim == 1 else nn.BatchNorm2d(channels)


class ConvAct(nn.Module):
    """conv → [BN] → [activation]"""

    def __init__(self, spec: dict, dim: int):
        super().__init__()
        self.conv = make_conv(spec["conv"], dim)
        self.bn = make_bn(spec["conv"]["cout"], dim) if spec["bn"] else None
        self.a = spec["act"]
        add_act(self, "act", self.a)

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return apply_act(self, "act", self.a, x)


class Residual(nn.Module):
    """skip(x) + body(x) (or body + skip), skip = identity or 1×1 strided projection [+ BN], then [act]."""

    def __init__(self, spec: dict, dim: int):
        super().__init__()
        self.body = nn.Sequential(*[ConvAct(s, dim) for s in spec["body"]])
        self.proj = make_conv(spec["proj"], dim) if spec["proj"] else None
        self.proj_bn = make_bn(spec["proj"]["cout"], dim) if spec["proj"] and spec["proj_bn"] else None
        self.skip_first = spec["skip_first"]
        self.add = spec["add"]
        self.a = spec["post"]
        add_act(self, "post", self.a)

    def forward(self, x):
        y = self.body(x)
        s = x
        if self.proj is not None:
            s = self.proj(x)
            if self.proj_bn is not None:
                s = self.proj_bn(s)
        first, second = (s, y) if self.skip_first else (y, s)
        if self.add == "torch":
            out = torch.add(first, second)
        elif self.add == "method":
            out = first.add(second)
        else:
            out = first + second
        return apply_act(self, "post", self.a, out)


class BasicBlock(nn.Module):
    """ResNet BasicBlock: 3×3 (stride) → BN → act → 3×3 → BN, + skip (identity or 1×1 + BN), act.
    ``shared``: one activation module called twice (call sites ``relu`` and ``relu#1``)."""

    def __init__(self, spec: dict, dim: int):
        super().__init__()
        cin, cout, s = spec["cin"], spec["cout"], spec["stride"]
        cls = nn.Conv1d if dim == 1 else nn.Conv2d
        self.conv1 = cls(cin, cout, 3, stride=s, padding=1, bias=False)
        self.bn1 = make_bn(cout, dim)
        self.conv2 = cls(cout, cout, 3, padding=1, bias=False)
        self.bn2 = make_bn(cout, dim)
        self.down = None
        if s != 1 or cin != cout:
            self.down = nn.Sequential(cls(cin, cout, 1, stride=s, bias=False), make_bn(cout, dim))
        self.a = spec["act"]
        self.shared = spec["shared"]
        add_act(self, "relu", self.a)
        if not self.shared:
            add_act(self, "relu2", self.a)

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = apply_act(self, "relu", self.a, self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return apply_act(self, "relu" if self.shared else "relu2", self.a, out)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1×1 expand → BN → ReLU6] → depthwise 3×3 (stride) → BN → ReLU6 → 1×1 → BN, + x."""

    def __init__(self, spec: dict, dim: int):
        super().__init__()
        cin, cout, t, s = spec["cin"], spec["cout"], spec["expand"], spec["stride"]
        cls = nn.Conv1d if dim == 1 else nn.Conv2d
        hidden = cin * t
        self.a = spec["act"]
        self.expand = None
        if t != 1:
            self.expand = nn.Sequential(cls(cin, hidden, 1, bias=False), make_bn(hidden, dim))
            add_act(self, "act1", self.a)
        self.dw = nn.Sequential(cls(hidden, hidden, 3, stride=s, padding=1, groups=hidden, bias=False),
                                make_bn(hidden, dim))
        add_act(self, "act2", self.a)
        self.project = nn.Sequential(cls(hidden, cout, 1, bias=False), make_bn(cout, dim))
        self.residual = s == 1 and cin == cout and spec["residual"]

    def forward(self, x):
        h = x
        if self.expand is not None:
            h = apply_act(self, "act1", self.a, self.expand(x))
        h = apply_act(self, "act2", self.a, self.dw(h))
        h = self.project(h)
        return x + h if self.residual else h


class PreAct(nn.Module):
    """conv(act(x)) + x. With an inplace activation the skip reads the activated x (eager semantics),
    and fold must not linearize it ("an inplace activation whose input is also used elsewhere")."""

    def __init__(self, spec: dict, dim: int):
        super().__init__()
        self.a = spec["act"]
        add_act(self, "act", self.a)
        self.conv = make_conv(spec["conv"], dim)

    def forward(self, x):
        x = x * 1.0  # a fresh tensor: an inplace activation must not write into this block's input
        return self.conv(apply_act(self, "act", self.a, x)) + x


class Parallel(nn.Module):
    """a(x) + b(x): two convs (possibly of different kernel sizes) with the same output shape, [act]."""

    def __init__(self, spec: dict, dim: int):
        super().__init__()
        self.a_conv = make_conv(spec["a"], dim)
        self.b_conv = make_conv(spec["b"], dim)
        self.a = spec["post"]
        add_act(self, "post", self.a)

    def forward(self, x):
        return apply_act(self, "post", self.a, self.a_conv(x) + self.b_conv(x))


class Act(nn.Module):
    """A bare activation (no producer: e.g. on the input, after a pool or a residual block)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.a = spec["act"]
        add_act(self, "act", self.a)

    def forward(self, x):
        return apply_act(self, "act", self.a, x)


def make_pool(spec: dict, dim: int) -> nn.Module:
    if spec["type"] == "max":
        cls = nn.MaxPool1d if dim == 1 else nn.MaxPool2d
        return cls(spec["k"], stride=spec["s"], padding=spec["p"])
    cls = nn.AvgPool1d if dim == 1 else nn.AvgPool2d
    return cls(spec["k"], stride=spec["s"], padding=spec["p"], count_include_pad=spec["count_pad"])


class LinAct(nn.Module):
    """Linear → [BatchNorm1d] → [activation]"""

    def __init__(self, spec: dict):
        super().__init__()
        self.fc = nn.Linear(spec["din"], spec["dout"], bias=spec["bias"])
        self.bn = nn.BatchNorm1d(spec["dout"]) if spec["bn"] else None
        self.a = spec["act"]
        add_act(self, "act", self.a)

    def forward(self, x):
        x = self.fc(x)
        if self.bn is not None:
            x = self.bn(x)
        return apply_act(self, "act", self.a, x)


class ResLinear(nn.Module):
    """x + fc2(act(fc1(x))), or x + fc(x) without a hidden layer."""

    def __init__(self, spec: dict):
        super().__init__()
        d, h = spec["d"], spec["hidden"]
        self.fc1 = nn.Linear(d, h or d, bias=spec["bias"])
        self.fc2 = nn.Linear(h, d) if h else None
        self.a = spec["act"] if h else None
        add_act(self, "act", self.a)

    def forward(self, x):
        y = self.fc1(x)
        if self.fc2 is not None:
            y = self.fc2(apply_act(self, "act", self.a, y))
        return x + y


class TransformerMLP(nn.Module):
    """Linear → GELU → Dropout → Linear [→ Dropout], optionally residual."""

    def __init__(self, spec: dict):
        super().__init__()
        self.fc1 = nn.Linear(spec["d"], spec["hidden"])
        self.a = spec["act"]
        add_act(self, "act", self.a)
        self.drop = nn.Dropout(0.1)
        self.functional_dropout = spec["drop_fn"]
        self.fc2 = nn.Linear(spec["hidden"], spec["d"])
        self.drop2 = nn.Dropout(0.1) if spec["drop2"] else nn.Identity()
        self.residual = spec["residual"]

    def forward(self, x):
        h = apply_act(self, "act", self.a, self.fc1(x))
        h = F.dropout(h, 0.1, self.training) if self.functional_dropout else self.drop(h)
        y = self.drop2(self.fc2(h))
        return x + y if self.residual else y


class Head(nn.Module):
    """flatten / average pool / mean → [Linear → act] → Linear"""

    def __init__(self, spec: dict, dim: int):
        super().__init__()
        self.pool = spec["pool"]
        if self.pool == "avg":
            self.avg = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dim = dim
        self.hidden = nn.Linear(spec["features"], spec["hidden"]) if spec["hidden"] else None
        self.a = spec["act"] if spec["hidden"] else None
        add_act(self, "act", self.a)
        self.fc = nn.Linear(spec["hidden"] or spec["features"], spec["out"])

    def forward(self, x):
        if self.pool == "avg":
            x = self.avg(x)
        elif self.pool == "mean":
            x = x.mean(dim=(2,) if self.dim == 1 else (2, 3))
        x = self.flatten(x)
        if self.hidden is not None:
            x = apply_act(self, "act", self.a, self.hidden(x))
        return self.fc(x)


def build_block(b: dict, dim: int) -> nn.Module:
    kind = b["kind"]
    if kind == "convact":
        return ConvAct(b, dim)
    if kind == "residual":
        return Residual(b, dim)
    if kind == "basic":
        return BasicBlock(b, dim)
    if kind == "inverted":
        return InvertedResidual(b, dim)
    if kind == "parallel":
        return Parallel(b, dim)
    if kind == "preact":
        return PreAct(b, dim)
    if kind == "identity":
        return nn.Identity()
    if kind == "act":
        return Act(b)
    if kind == "pool":
        return make_pool(b, dim)
    if kind == "dropout":
        return nn.Dropout(0.25)
    if kind == "linact":
        return LinAct(b)
    if kind == "reslin":
        return ResLinear(b)
    if kind == "tmlp":
        return TransformerMLP(b)
    if kind == "head":
        return Head(b, dim)
    raise AssertionError(kind)


@torch.no_grad()
def build_model(spec: dict, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The network of ``spec`` in eval mode, with seeded weights and random BatchNorm statistics."""
    dim = {"conv1d": 1, "conv2d": 2, "mlp": 0}[spec["family"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(*[build_block(b, dim) for b in spec["blocks"]])
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c) * 0.5)
                m.running_var.copy_(torch.rand(c) * 1.5 + 0.5)
                m.weight.copy_((torch.rand(c) + 0.5) * torch.where(torch.rand(c) < 0.2, -1.0, 1.0))
                m.bias.copy_(torch.randn(c) * 0.5)
    return model.to(dtype).eval()


def make_input(spec: dict, batch: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *spec["input"], generator=g) * scale).to(dtype)


def other_size_input(spec: dict, seed: int, dtype: torch.dtype, grow: int):
    """An input ``grow`` positions larger in every spatial dim, or None when the net fixes its size
    (MLPs; a flatten head)."""
    if spec["family"] == "mlp" or any(b["kind"] == "head" and b["pool"] == "flatten" for b in spec["blocks"]):
        return None
    channels, *size = spec["input"]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, channels, *[n + grow for n in size], generator=g) * 2).to(dtype)


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


@st.composite
def act_specs(draw, kinds=("relu", "relu6", "leaky"), inplace=True):
    kind = draw(st.sampled_from(kinds))
    styles = {"relu": ["module", "functional", "method", "torch"], "gelu": ["module", "functional"]}.get(
        kind, ["module", "functional"])
    a = {"kind": kind, "style": draw(st.sampled_from(styles)),
         "inplace": kind != "gelu" and inplace and draw(st.booleans())}
    if kind == "gelu":
        a["approx"] = draw(st.sampled_from(["none", "tanh"]))
    return a


def maybe_act(kinds=("relu", "relu6", "leaky")):
    return st.one_of(act_specs(kinds), act_specs(kinds), act_specs(kinds), st.none())


def conv_out(size: tuple, k: tuple, s: tuple, p, d: tuple) -> tuple:
    if p == "same":
        return size
    if p == "valid":
        p = (0,) * len(size)
    return tuple((n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(size, k, s, p, d))


@st.composite
def conv_specs(draw, cin: int, size: tuple, *, cout: int | None = None, same: bool = False, stride: int = 1,
               exotic: bool = True):
    """One conv on ``cin`` channels of spatial ``size``; returns (spec, output size).

    ``same``: odd kernel, padding k//2, the given stride (output size (n − 1)//stride + 1, so that
    it matches a 1×1 projection of the same stride). Otherwise kernel 1–5, stride 1–2 and padding
    0..k per dimension, with an output of at least 1 and at most MAX_SIZE; rarely dilation 2, a
    circular / reflect padding mode or padding "same" / "valid" (which folding must leave alone or
    handle exactly).
    """
    dims = len(size)
    groups = [1]
    if cin % 2 == 0 and (cout is None or cout % 2 == 0):
        groups.append(2)
    if cin > 1 and (cout is None or cout % cin == 0):
        groups.append(cin)  # depthwise (channel multiplier cout / cin)
    g = draw(st.sampled_from(groups))
    if cout is None:
        if g == cin and g > 1:
            cout = cin * draw(st.sampled_from([1, 2]))
        else:
            cout = g * draw(st.integers(1, MAX_CH // g))
    d = (1,) * dims
    pm = "zeros"
    if same:
        k = tuple(draw(st.sampled_from([3, 1, 5])) for _ in range(dims))
        p = tuple(kk // 2 for kk in k)
        s = (stride,) * dims
    else:
        flavour = draw(st.integers(0, 11)) if exotic else 0
        if flavour == 7:
            d = (2,) * dims
        k, s, p = [], [], []
        for n, dd in zip(size, d):
            kk = draw(st.integers(1, 5))
            ss = draw(st.integers(1, 2))
            eff = dd * (kk - 1) + 1
            lo = max(0, math.ceil((eff - n) / 2))
            hi = kk
            while hi > lo and (n + 2 * hi - eff) // ss + 1 > MAX_SIZE:
                hi -= 1
            k.append(kk)
            s.append(ss)
            p.append(draw(st.integers(lo, hi)))
        k, s, p = tuple(k), tuple(s), tuple(p)
        if flavour == 8 and all(pp <= n for pp, n in zip(p, size)):
            pm = "circular"
        elif flavour == 9 and all(pp < n for pp, n in zip(p, size)):
            pm = "reflect"
        elif flavour == 10:  # padding="same" (stride 1; an even kernel pads asymmetrically)
            s, p = (1,) * dims, "same"
        elif flavour == 11 and all(kk <= n for kk, n in zip(k, size)):
            p = "valid"
    spec = {"cin": cin, "cout": cout, "k": k, "s": s, "p": p, "d": d, "g": g, "bias": draw(st.booleans()),
            "pm": pm}
    return spec, conv_out(size, k, s, p, d)


@st.composite
def convact_specs(draw, cin, size, *, cout=None, same=False, stride=1, act=True, kinds=("relu", "relu6", "leaky")):
    conv, out = draw(conv_specs(cin, size, cout=cout, same=same, stride=stride))
    b = {"kind": "convact", "conv": conv, "bn": draw(st.booleans()), "act": draw(maybe_act(kinds)) if act else None}
    return b, conv["cout"], out


@st.composite
def conv_blocks(draw, cin: int, size: tuple):
    """One block of a conv stack; returns (spec, channels, size)."""
    kind = draw(st.sampled_from(["convact", "residual", "basic", "inverted", "parallel", "identity", "dropout",
                                 "act", "pool", "preact"]))
    dims = len(size)
    if kind == "convact":
        return draw(convact_specs(cin, size, kinds=("relu", "relu6", "leaky", "relu", "relu6", "leaky", "gelu")))
    if kind in ("identity", "dropout"):
        return {"kind": kind}, cin, size
    if kind == "act":  # never inplace: it may be applied to the model's input
        return {"kind": "act", "act": draw(act_specs(("relu", "relu6", "leaky"), inplace=False))}, cin, size
    if kind == "preact":
        conv, _ = draw(conv_specs(cin, size, cout=cin, same=True))
        return {"kind": "preact", "act": draw(act_specs()), "conv": conv}, cin, size
    if kind == "pool":
        k = draw(st.integers(1, 3))
        if k > min(size):
            return {"kind": "identity"}, cin, size
        stride = draw(st.integers(1, 2))
        p = draw(st.integers(0, k // 2))
        b = {"kind": "pool", "type": draw(st.sampled_from(["max", "avg"])), "k": k, "s": stride, "p": p,
             "count_pad": draw(st.booleans())}
        return b, cin, tuple((n + 2 * p - k) // stride + 1 for n in size)
    stride = draw(st.sampled_from([1, 2]))
    out = tuple((n - 1) // stride + 1 for n in size)
    if kind == "residual":
        identity = stride == 1 and draw(st.booleans())
        c_out = cin if identity else draw(st.integers(1, MAX_CH))
        body = []
        if draw(st.booleans()):  # two layers: first strided, then same-size
            first, mid, _ = draw(convact_specs(cin, size, same=True, stride=stride))
            second, _, _ = draw(convact_specs(mid, out, cout=c_out, same=True, act=draw(st.booleans())))
            body = [first, second]
        else:
            only, _, _ = draw(convact_specs(cin, size, cout=c_out, same=True, stride=stride, act=draw(st.booleans())))
            body = [only]
        proj = None
        if not identity:
            proj = {"cin": cin, "cout": c_out, "k": (1,) * dims, "s": (stride,) * dims, "p": (0,) * dims,
                    "d": (1,) * dims, "g": 1, "bias": draw(st.booleans()), "pm": "zeros"}
        b = {"kind": "residual", "body": body, "proj": proj, "proj_bn": draw(st.booleans()),
             "skip_first": draw(st.booleans()), "add": draw(st.sampled_from(["+", "torch", "method"])),
             "post": draw(maybe_act())}
        return b, c_out, out
    if kind == "basic":
        c_out = draw(st.sampled_from([cin, draw(st.integers(1, MAX_CH))]))
        a = draw(act_specs(("relu", "leaky", "relu6")))
        return {"kind": "basic", "cin": cin, "cout": c_out, "stride": stride, "act": a,
                "shared": a["style"] == "module" and draw(st.booleans())}, c_out, out
    if kind == "inverted":
        c_out = draw(st.sampled_from([cin, draw(st.integers(1, MAX_CH))]))
        t = draw(st.sampled_from([1, 2, 3] if cin <= 3 else [1, 2]))
        a = draw(act_specs(("relu6",)))
        return {"kind": "inverted", "cin": cin, "cout": c_out, "expand": t, "stride": stride, "act": a,
                "residual": draw(st.booleans())}, c_out, out
    if kind == "parallel":
        a_conv, _ = draw(conv_specs(cin, size, same=True, stride=stride))
        b_conv, _ = draw(conv_specs(cin, size, cout=a_conv["cout"], same=True, stride=stride))
        return {"kind": "parallel", "a": a_conv, "b": b_conv, "post": draw(maybe_act())}, a_conv["cout"], out
    raise AssertionError(kind)


@st.composite
def conv_nets(draw, dim: int):
    if dim == 2:
        size = (draw(st.integers(1, 13)), draw(st.integers(1, 13)))
    else:
        size = (draw(st.integers(1, 20)),)
    c = draw(st.integers(1, 4))
    spec = {"family": f"conv{dim}d", "input": (c, *size), "blocks": []}
    for _ in range(draw(st.integers(1, 4))):
        b, c, size = draw(conv_blocks(c, size))
        spec["blocks"].append(b)
    if not has_activation(spec):
        b, c, size = draw(convact_specs(c, size, act=False))
        b["act"] = draw(act_specs())
        spec["blocks"].append(b)
    pool = draw(st.sampled_from(["none", "flatten", "avg", "mean"]))
    if pool != "none":
        features = c * math.prod(size) if pool == "flatten" else c
        hidden = draw(st.sampled_from([0, 0, 4]))
        spec["blocks"].append({"kind": "head", "pool": pool, "features": features, "hidden": hidden,
                               "act": draw(act_specs()) if hidden else None, "out": draw(st.integers(1, 5))})
    return spec


@st.composite
def mlp_nets(draw):
    tokens = draw(st.sampled_from([0, 0, 1, 3]))
    d = draw(st.integers(1, 8))
    spec = {"family": "mlp", "input": (tokens, d) if tokens else (d,), "blocks": []}
    kinds_all = ("relu", "relu6", "leaky", "gelu")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linact", "reslin", "tmlp", "dropout", "identity", "act"]))
        if kind == "linact":
            dout = draw(st.integers(1, 8))
            b = {"kind": "linact", "din": d, "dout": dout, "bias": draw(st.booleans()),
                 "bn": not tokens and draw(st.booleans()), "act": draw(maybe_act(kinds_all))}
            d = dout
        elif kind == "reslin":
            hidden = draw(st.sampled_from([0, 3, 8]))
            b = {"kind": "reslin", "d": d, "hidden": hidden, "bias": draw(st.booleans()),
                 "act": draw(act_specs(kinds_all)) if hidden else None}
        elif kind == "tmlp":
            b = {"kind": "tmlp", "d": d, "hidden": draw(st.integers(2, 12)), "residual": draw(st.booleans()),
                 "drop2": draw(st.booleans()), "drop_fn": draw(st.booleans()),
                 "act": draw(act_specs(("gelu", "gelu", "relu")))}
        elif kind == "act":
            b = {"kind": "act", "act": draw(act_specs(kinds_all, inplace=False))}
        else:
            b = {"kind": kind}
        spec["blocks"].append(b)
    if not has_activation(spec):
        spec["blocks"].append({"kind": "linact", "din": d, "dout": d, "bias": True, "bn": False,
                               "act": draw(act_specs(kinds_all))})
    return spec


def has_activation(spec) -> bool:
    """Whether a spec holds an activation (measuring needs at least one call site)."""
    if isinstance(spec, dict):
        return spec.get("kind") in ("relu", "relu6", "leaky", "gelu", "basic", "inverted", "tmlp") \
            or any(has_activation(v) for v in spec.values())
    if isinstance(spec, (list, tuple)):
        return any(has_activation(v) for v in spec)
    return False


def state_codes(kind: str) -> list[int]:
    """The linear states a rectifier kind can be forced into."""
    return {"relu6": [ON, OFF, SAT]}.get(kind, [ON, OFF])


@st.composite
def site_states(draw, channels: int, kind: str):
    """"on" / "off" / "sat" for a whole layer, a per-neuron mix of them, or a mixed layer (≥ 1 MIXED)."""
    codes = state_codes(kind)
    mode = draw(st.sampled_from(["layer", "neurons", "mixed"]))
    if mode == "layer":
        return {ON: "on", OFF: "off", SAT: "sat", MIXED: "mixed"}[draw(st.sampled_from(codes + [MIXED]))]
    per = draw(st.lists(st.sampled_from(codes + ([MIXED] if mode == "mixed" else [])),
                        min_size=channels, max_size=channels))
    if mode == "mixed":
        per[draw(st.integers(0, channels - 1))] = MIXED
    return per


# --------------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------------


def check_case(data, spec: dict, dtype: torch.dtype, tol: float) -> None:
    """Draw the rest of a case for ``spec`` (seed, call-site states, emptied layers) and check it."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = build_model(spec, seed, dtype)
    x = make_input(spec, 2, seed + 1, dtype)
    probe = forced_stats(model, x)
    states = {}
    for name, hist in probe.histogram.items():
        kind = {"leaky_relu": "leaky"}.get(probe.sites[name].rectifier.kind, probe.sites[name].rectifier.kind)
        states[name] = data.draw(site_states(hist.shape[0], kind), label=f"state {name}")
    linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    emptied = data.draw(st.lists(st.sampled_from(linear_names), max_size=2, unique=True) if linear_names
                        else st.just([]), label="emptied")
    approximate = data.draw(st.booleans(), label="approximate")
    run_case(dict(spec=spec, seed=seed, states=states, emptied=emptied, approximate=approximate), dtype, tol)


def _note(message: str) -> None:
    """hypothesis' ``note`` inside a property, a print (shown by pytest on failure) elsewhere."""
    try:
        note(message)
    except InvalidArgument:
        print(message)


def run_case(case: dict, dtype: torch.dtype = torch.float32, tol: float = FP32_TOL) -> None:
    """Fold the case's model and compare it with the oracle; ``case`` (printed on failure) replays it."""
    _note(f"case = {case!r}")
    spec, seed, states, approximate = case["spec"], case["seed"], case["states"], case["approximate"]
    model = build_model(spec, seed, dtype)
    x = make_input(spec, 2, seed + 1, dtype)
    empty_layers(model, case["emptied"])
    stats = forced(model, x, states)
    sites = [(name, h.shape[0], stats.sites[name].rectifier) for name, h in stats.histogram.items()]

    before = state_dict_copy(model)
    folded = fold_all(model, stats, x, approximate=approximate)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "fold modified the model it was given"
    report = folded.fold_report
    _note(f"merges = {report.merges}, skipped = {report.skipped}, removed = {report.removed}")
    # fold may leave a linearizable call site alone (with a reason): the oracle then keeps it too
    kept = {e["node"] for e in report.skipped} & {n for n, _, _ in sites} - set(report.removed)
    oracle_stats = forced(model, x, {**states, **{n: "mixed" for n in kept}}) if kept else stats
    oracle = linearized(model, oracle_stats, approximate=approximate)

    x_test = make_input(spec, 3, seed + 2, dtype, scale=2.0)  # fresh: states of the real model do not hold
    with torch.no_grad():
        ref, out = oracle(x_test), folded(x_test)
        err = rel_err(out, ref)
        err_calib = rel_err(folded(x), oracle(x))
    assert err <= tol, f"folded model differs from linearized(model, stats) on a fresh input: rel. error {err:.3g}"
    assert err_calib <= tol, (f"folded model differs from linearized(model, stats) on the calibration input: "
                              f"{err_calib:.3g}")
    for grow in (1, 3):  # a conv net without a flatten head also runs on other sizes, and must agree there too
        x_other = other_size_input(spec, seed + 2 + grow, dtype, grow)
        if x_other is None:
            continue
        with torch.no_grad():
            try:
                ref = oracle(x_other)
            except RuntimeError:  # too small somewhere for this network
                continue
            err_other = rel_err(folded(x_other), ref)
        assert err_other <= tol, (f"folded model differs from linearized(model, stats) on an input of shape "
                                  f"{tuple(x_other.shape)} (folded at {tuple(x.shape)}): rel. error {err_other:.3g}")

    # the report accounts for every call site
    for entry in report.skipped:
        assert isinstance(entry.get("node"), str) and entry["node"], f"skipped entry without a node: {entry}"
        assert isinstance(entry.get("reason"), str) and entry["reason"].strip(), \
            f"skipped entry without a reason: {entry}"
    skipped = {entry["node"] for entry in report.skipped}
    names = [name for name, _, _ in sites]
    exact = {name: rect.exact for name, _, rect in sites}
    foldable = {n for n in names if stats.linearizable(n) and (exact[n] or approximate)}
    removed = set(report.removed)
    assert report.rectifier_layers_total == len(names)
    assert len(report.removed) == len(removed) == report.rectifier_layers_removed
    assert removed <= foldable, f"removed call sites that are not linearizable: {sorted(removed - foldable)}"
    assert foldable - removed <= skipped, \
        f"linearizable call sites neither removed nor skipped: {sorted(foldable - removed - skipped)}"
    assert set(report.approximated) == {n for n in removed if not exact[n]}
    left = [s.name for s in find_sites(folded)]  # fewer if a kept one only fed an emptied (deleted) op
    assert len(left) <= len(names) - len(removed), (
        f"{len(names) - len(removed)} call sites kept of {names}, but the folded graph has rectifiers {left}")


@settings(max_examples=150, **PROPERTY)
@given(data=st.data())
def test_fold_equals_linearized_conv2d(data):
    check_case(data, data.draw(conv_nets(2), label="net"), torch.float32, FP32_TOL)


@settings(max_examples=80, **PROPERTY)
@given(data=st.data())
def test_fold_equals_linearized_conv1d(data):
    check_case(data, data.draw(conv_nets(1), label="net"), torch.float32, FP32_TOL)


@settings(max_examples=100, **PROPERTY)
@given(data=st.data())
def test_fold_equals_linearized_mlp(data):
    check_case(data, data.draw(mlp_nets(), label="net"), torch.float32, FP32_TOL)


@settings(max_examples=80, **PROPERTY)
@given(data=st.data())
def test_fold_equals_linearized_float64(data):
    spec = data.draw(st.one_of(conv_nets(2), conv_nets(1), mlp_nets()), label="net")
    check_case(data, spec, torch.float64, FP64_TOL)


# Cases found by the properties above (shrunk by hand), replayed on every run.
_RELU = {"kind": "relu", "style": "module", "inplace": False}
_CONV_2_2 = {"cin": 2, "cout": 2, "k": (3, 3), "s": (1, 1), "p": (1, 1), "d": (1, 1), "g": 1, "bias": True,
             "pm": "zeros"}
_SKIP_BLOCK = {"kind": "residual", "body": [{"kind": "convact", "conv": _CONV_2_2, "bn": False, "act": None}],
               "proj": None, "proj_bn": False, "skip_first": True, "add": "+", "post": _RELU}
KNOWN_CASES = {
    # a kept ReLU (layer mixed) with an always-OFF neuron, after a residual add / with no producer
    "dead-neuron-after-add": (dict(spec={"family": "conv2d", "input": (2, 5, 5), "blocks": [_SKIP_BLOCK]}, seed=0,
                                   states={"0.post": [MIXED, OFF]}, emptied=[], approximate=False), torch.float32),
    "dead-neuron-on-input": (dict(spec={"family": "conv2d", "input": (2, 5, 5),
                                        "blocks": [{"kind": "act", "act": _RELU}]}, seed=0,
                                  states={"0.act": [MIXED, OFF]}, emptied=[], approximate=False), torch.float32),
    # float64: a LeakyReLU linearized after an add (ChannelAffine) keeps its slope 0.1 exactly
    "fp64-leaky-after-add": (dict(spec={"family": "conv2d", "input": (2, 5, 5),
                                        "blocks": [dict(_SKIP_BLOCK, post={"kind": "leaky", "style": "module",
                                                                           "inplace": False})]}, seed=0,
                                  states={"0.post": "off"}, emptied=[], approximate=False), torch.float64),
    # tokens (N, T, D): an emptied Linear's constant propagated through a ReLU whose neurons are dim 1
    # an inplace ReLU kept (its input is also the skip) whose result only fed an emptied conv
    "inplace-side-effect-of-dead-relu": (dict(spec={"family": "conv2d", "input": (2, 5, 5), "blocks": [
        {"kind": "preact", "act": {"kind": "relu", "style": "module", "inplace": True}, "conv": _CONV_2_2}]},
        seed=0, states={"0.act": "mixed"}, emptied=["0.conv"], approximate=False), torch.float32),
    "tokens-constant-through-relu": (dict(spec={"family": "mlp", "input": (3, 2), "blocks": [
        {"kind": "linact", "din": 2, "dout": 2, "bias": True, "bn": False, "act": _RELU},
        {"kind": "act", "act": _RELU}]}, seed=0, states={"0.act": "on", "1.act": "off"}, emptied=["0.fc"],
        approximate=False), torch.float32),
    # residual branches emptied by pruning: x + c1 + c2 + c3 collapses to one offset, absorbed by the next
    # Linear's bias (mlp), by an unpadded 1x1 conv's (conv2d); a padded conv keeps it as an offset op
    **{f"constant-chain-{name}": (dict(spec=spec, seed=3, states=states, emptied=emptied, approximate=False), dtype)
       for name, spec, states, emptied, dtype in (
           ("mlp", {"family": "mlp", "input": (4,), "blocks": [
               {"kind": "linact", "din": 4, "dout": 4, "bias": True, "bn": False, "act": _RELU},
               *[{"kind": "reslin", "d": 4, "hidden": 3, "bias": True, "act": _RELU}] * 3,
               {"kind": "linact", "din": 4, "dout": 2, "bias": True, "bn": False, "act": None}]},
            {"0.act": "mixed"}, ["1.fc1", "2.fc1", "3.fc1"], torch.float32),
           ("mlp-fp64-fc2", {"family": "mlp", "input": (3, 4), "blocks": [
               {"kind": "linact", "din": 4, "dout": 4, "bias": True, "bn": False, "act": _RELU},
               *[{"kind": "reslin", "d": 4, "hidden": 3, "bias": True, "act": _RELU}] * 3,
               {"kind": "linact", "din": 4, "dout": 2, "bias": True, "bn": False, "act": None}]},
            {"0.act": "mixed", "2.act": "mixed"}, ["1.fc2", "2.fc2", "3.fc1"], torch.float64),
           *[(f"conv2d-{head}", {"family": "conv2d", "input": (2, 5, 5), "blocks": [
               {"kind": "convact", "conv": _CONV_2_2, "bn": True, "act": _RELU},
               *[dict(_SKIP_BLOCK, post=None, skip_first=bool(i % 2), add=add) for i, add in
                 enumerate(("+", "torch", "method"))],
               {"kind": "convact", "conv": dict(_CONV_2_2, k=(k, k), p=(p, p)), "bn": False, "act": None}]},
              {"0.act": "mixed"}, ["1.body.0.conv", "2.body.0.conv", "3.body.0.conv"], torch.float32)
             for head, k, p in (("1x1", 1, 0), ("padded", 3, 1))],
       )},
}


@pytest.mark.parametrize("name", list(KNOWN_CASES))
def test_known_cases(name):
    case, dtype = KNOWN_CASES[name]
    run_case(case, dtype, FP64_TOL if dtype == torch.float64 else FP32_TOL)


# --------------------------------------------------------------------------------------------------
# Zero padding at the borders: conv(3×3, p=1) → rectifier → conv(3×3, p=1)
# --------------------------------------------------------------------------------------------------


def border_mask(shape: torch.Size) -> torch.Tensor:
    """True on the first / last position of every spatial dimension of an N×C×… map."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for d in range(2, len(shape)):
        index = [slice(None)] * len(shape)
        for edge in (0, shape[d] - 1):
            index[d] = edge
            mask[tuple(index)] = True
    return mask


BORDER_STATES = {  # activation, state of its call site
    "relu-on": (nn.ReLU, "on"),
    "leaky-off": (lambda: nn.LeakyReLU(0.1), "off"),
    "relu6-sat": (nn.ReLU6, "sat"),
    "relu6-neurons": (nn.ReLU6, [ON, SAT, OFF, ON]),
}


@pytest.mark.parametrize("dim", [2, 1])
@pytest.mark.parametrize("state", list(BORDER_STATES))
@pytest.mark.parametrize("strides", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_zero_padding_at_borders(size, strides, state, dim):
    """The second conv zero-pads the *rectifier's output*; a composed kernel sees the first conv's
    response (its bias, BN shift, saturation constant) there instead, unless the border is corrected."""
    act, forced_state = BORDER_STATES[state]
    conv = nn.Conv2d if dim == 2 else nn.Conv1d
    bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(size * 100 + strides[0] * 10 + strides[1])
        layers = [conv(3, 4, 3, stride=strides[0], padding=1)]
        if size % 2:  # with BatchNorm (a shift at the borders too) on odd sizes
            layers.append(bn(4))
            layers[-1].running_mean.uniform_(-1, 1)
            layers[-1].running_var.uniform_(0.5, 2)
            layers[-1].bias.data.uniform_(-1, 1)
        layers += [act(), conv(4, 5, 3, stride=strides[1], padding=1)]
        model = nn.Sequential(*layers).eval()
        shape = (2, 3) + (size,) * dim
        x, x_test = torch.randn(shape), torch.randn(shape) * 3
    site = str(len(layers) - 2)
    stats = forced(model, x, {site: forced_state})
    assert stats.linearizable(site)
    folded = fold_all(model, stats, x)
    oracle = linearized(model, stats)
    report = folded.fold_report
    assert report.rectifier_layers_removed == 1 or site in {s["node"] for s in report.skipped}
    # the folded model is checked at the size it was folded at, then at every other small size
    for other in dict.fromkeys([size, 1, 2, 3, 4, 5, 8]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(other)
            x_test = x_test if other == size else torch.randn((3, 3) + (other,) * dim) * 3
        with torch.no_grad():
            ref, out = oracle(x_test), folded(x_test)
        assert out.shape == ref.shape
        scale = max(float(ref.abs().max()), 1e-3)
        border = border_mask(ref.shape)
        err_border = float((out - ref).abs()[border].max()) / scale
        err_inside = float((out - ref).abs()[~border].max()) / scale if bool((~border).any()) else 0.0
        assert err_border <= FP32_TOL and err_inside <= FP32_TOL, (
            f"input {tuple(x_test.shape)} (folded at size {size}): border error {err_border:.3g}, interior error "
            f"{err_inside:.3g}; merges {report.merges}, skipped {report.skipped}")


# --------------------------------------------------------------------------------------------------
# The tools the property relies on
# --------------------------------------------------------------------------------------------------


def test_oracle_is_the_linearized_model():
    """``linearized`` with every site "on" is the model with its rectifiers removed; "off" ReLUs give 0;
    "sat" ReLU6 gives 6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU6(),
                          nn.Conv2d(3, 2, 1)).eval()
    x = torch.randn(2, 2, 5, 5)
    plain = nn.Sequential(model[0], nn.Identity(), model[2], nn.Identity(), model[4])
    with torch.no_grad():
        assert torch.allclose(linearized(model, forced(model, x, {"1": "on", "3": "on"}))(x), plain(x), atol=1e-6)
        off = linearized(model, forced(model, x, {"1": "off", "3": "on"}))(x)
        bias_only = model[4](model[2](torch.zeros(2, 3, 5, 5)))
        assert torch.allclose(off, bias_only, atol=1e-6)
        sat = linearized(model, forced(model, x, {"1": "on", "3": "sat"}))(x)
        assert torch.allclose(sat, model[4](torch.full((2, 3, 5, 5), 6.0)), atol=1e-5)


def test_forced_stats_states_mean_what_they_say():
    """A neuron forced "sat" is always-saturated (not always-off), "on" always-on, "off" always-off,
    and a layer with a "mixed" neuron is not linearizable."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU6()).eval()
    x = torch.randn(2, 2, 6, 6)
    stats = forced_stats(model, x, {"1": torch.tensor([ON, OFF, SAT, SAT])})
    assert stats.always_on["1"].tolist() == [True, False, False, False]
    assert stats.always_off["1"].tolist() == [False, True, False, False]
    assert stats.always_saturated["1"].tolist() == [False, False, True, True], (
        "forced_stats counts a SAT neuron in the SAT column only; the histogram counts SAT as a subset of ON "
        f"(nepenthe.ops.reference), so it reads as always-OFF: histogram {stats.histogram['1'].tolist()}")
    assert stats.linearizable("1")
    assert not forced_stats(model, x, {"1": torch.tensor([ON, MIXED, OFF, SAT])}).linearizable("1")
