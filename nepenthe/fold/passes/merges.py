"""Pass 4: exact merges of adjacent linear ops (Linear∘Linear, Conv∘Conv with border
correction, skips and parallel branches added into one op), as the planner accepts them."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..._utils import set_submodule
from ...activations import ADD_FUNCTIONS
from .. import algebra, border
from .._fx import erase, linear_op, module_of, only_user
from ..planner import Candidate, Planner
from ..report import FoldReport, note_blocked

__all__ = ["merge_linear_ops"]


def _skip_candidates(gm: fx.GraphModule, node: fx.Node, report: FoldReport):
    """``x + m(x)`` -> one op (identity added into m), and ``a(x) + b(x)`` -> one op."""
    if not (node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs):
        return
    a, b = node.args
    for skip, body in ((a, b), (b, a)):
        m = module_of(gm, body)
        if linear_op(m) and only_user(body) is node and body.args and body.args[0] is skip:
            reason = algebra.identity_blocker(m)
            if reason:
                note_blocked(report, f"skip + {body.target}", reason)
                continue

            def apply(merged, body=body):
                set_submodule(gm, body.target, merged)
                node.replace_all_uses_with(body)
                erase(gm, node)

            yield Candidate(f"skip + {body.target}", skip, lambda x, m=m: x + m(x),
                            lambda m=m: algebra.add_identity(m), apply, ops=(m,), kind="skip")
    ma, mb = module_of(gm, a), module_of(gm, b)
    if (linear_op(ma) and linear_op(mb) and a is not b and only_user(a) is node
            and only_user(b) is node and a.args and b.args and a.args[0] is b.args[0]):
        key = f"{a.target} + {b.target}"
        reason = algebra.branches_blocker(ma, mb)
        if reason:
            note_blocked(report, key, reason)
            return

        def apply(merged):
            set_submodule(gm, a.target, merged)
            node.replace_all_uses_with(a)
            erase(gm, node, b)

        yield Candidate(key, a.args[0], lambda x: ma(x) + mb(x), lambda: algebra.merge_branches(ma, mb), apply,
                        ops=(ma, mb), kind="branches")


def _chain_candidate(gm: fx.GraphModule, node: fx.Node, report: FoldReport):
    """``second(first(x))`` -> one op."""
    second = module_of(gm, node)
    if not isinstance(second, algebra.LINEAR_MODULES) or not node.args or not isinstance(node.args[0], fx.Node):
        return
    prev = node.args[0]
    first = module_of(gm, prev)
    if not isinstance(first, algebra.LINEAR_MODULES) or only_user(prev) is not node or not prev.args:
        return
    if not (algebra.is_foldable(first) and algebra.is_foldable(second)):
        note_blocked(report, f"{prev.target} -> {node.target}", algebra.conv_merge_blocker(first, second)
                      or "only Linear, Conv1d and Conv2d are merged")
        return
    key = f"{prev.target} + {node.target}"
    corrected = False
    if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
        build = lambda: algebra.merge_linear_linear(first, second)  # noqa: E731
    elif isinstance(first, nn.Linear) or isinstance(second, nn.Linear):
        return
    else:
        reason = border.merge_padded_blocker(first, second)
        if reason:
            note_blocked(report, f"{prev.target} -> {node.target}", reason)
            return
        build = lambda: border.merge_padded(first, second)  # noqa: E731
        # a zero-padding second conv makes the merge exact only with a border correction
        corrected = algebra.conv_merge_blocker(first, second) is not None

    def apply(merged):
        set_submodule(gm, node.target, merged)
        node.args = (prev.args[0],) + tuple(node.args[1:])
        erase(gm, prev)

    yield Candidate(key, prev.args[0], lambda x: second(first(x)), build, apply,
                    corrected=not isinstance(first, nn.Linear) and corrected, ops=(first, second), kind="chain",
                    groups=lambda: _chain_groups(gm, prev, node))


_MAX_CHAIN = 6  # ops in a chain the planner looks ahead through


def _merge_pair(first: nn.Module, second: nn.Module) -> nn.Module | None:
    """``second(first(x))`` as one op, as a chain merge makes it, or None when it cannot be."""
    if not (algebra.is_foldable(first) and algebra.is_foldable(second)):
        return None
    if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
        return algebra.merge_linear_linear(first, second) if first.out_features == second.in_features else None
    if isinstance(first, nn.Linear) or isinstance(second, nn.Linear) or border.merge_padded_blocker(first, second):
        return None
    return border.merge_padded(first, second)


def _chain_groups(gm: fx.GraphModule, prev: fx.Node, node: fx.Node):
    """Longer chains of Conv/Linear ops (each feeding only the next) around the candidate
    ``node(prev(x))``, shortest first, as ``(key, input node, unmerged fn, build)``: a merge with more
    FLOPs can be the first step of a chain whose full merge has fewer (MobileNetV2's expand →
    depthwise → project, once its activations are linear)."""
    nodes = [prev, node]
    while len(nodes) < _MAX_CHAIN:
        head = nodes[0]
        inp = head.args[0] if head.args and isinstance(head.args[0], fx.Node) else None
        if inp is None or not algebra.is_foldable(module_of(gm, inp)) or only_user(inp) is not head or not inp.args:
            break
        nodes.insert(0, inp)
    while len(nodes) < _MAX_CHAIN:
        tail = nodes[-1]
        user = only_user(tail)
        if (user is None or not algebra.is_foldable(module_of(gm, user)) or not user.args or user.args[0] is not tail
                or len(user.all_input_nodes) != 1):
            break
        nodes.append(user)
    a, b = nodes.index(prev), nodes.index(node)
    windows = sorted(((i, j) for i in range(a + 1) for j in range(b, len(nodes)) if j - i >= 2),
                     key=lambda w: (w[1] - w[0], w[0]))
    for i, j in windows:
        ops = [module_of(gm, n) for n in nodes[i:j + 1]]

        def unmerged(x, ops=ops):
            for op in ops:
                x = op(x)
            return x

        def build(ops=ops):
            merged = ops[-1]
            for op in reversed(ops[:-1]):
                if merged is not ops[-1] and not algebra.is_foldable(merged):
                    return None  # a border-corrected conv composes no further
                merged = _merge_pair(op, merged)
                if merged is None:
                    return None
            return merged

        yield " -> ".join(str(n.target) for n in nodes[i:j + 1]), nodes[i].args[0], unmerged, build


def _candidates(gm: fx.GraphModule, report: FoldReport):
    for node in gm.graph.nodes:
        yield from _skip_candidates(gm, node, report)
        yield from _chain_candidate(gm, node, report)


def merge_linear_ops(gm: fx.GraphModule, report: FoldReport, planner: Planner) -> None:
    """Make the exact merges the planner accepts, until none is left (each merge can expose another)."""
    if not planner.merges:
        return
    rejected: set[str] = set()

    def merge_one(corrected: bool) -> bool:
        for candidate in _candidates(gm, report):
            if candidate.key in rejected or candidate.corrected != corrected:
                continue
            merged = candidate.build()
            if not planner.accept(candidate, merged):
                rejected.add(candidate.key)
                continue
            candidate.apply(merged)
            report.ops_merged += 1
            report.merges.append(candidate.key)
            return True
        return False

    # plain merges first: a border-corrected conv composes no further, so e.g. in an inverted
    # residual the depthwise and projection convs merge before the expansion conv joins them
    while merge_one(False) or merge_one(True):
        pass
