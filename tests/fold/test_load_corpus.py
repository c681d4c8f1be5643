"""The tamper corpus of issue 14: ~75 folders made from one real saved model, each altered in one
way (names, targets, kwargs, attributes, sizes, links, FIFOs, zip bombs, broken graphs, hostile
weights). load() refuses every one with a RecipeError that names what is wrong, in under a second,
with under 100 MB of Python allocations (tracemalloc) and of tensor storage (every tensor created
on a real device, counted by a dispatch mode); and nothing in the folder ever runs (canary)."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import tracemalloc
import zipfile

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nepenthe
from nepenthe.errors import NepentheError, RecipeError

from .saved_model import copy_saved, edit_recipe, make_saved, node

LIMIT_S, LIMIT_BYTES = 1.0, 100 * 2**20
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # the quantized case


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_saved(tmp_path_factory.mktemp("corpus") / "base")


class TensorBytes(TorchDispatchMode):
    """Bytes of storage of every non-meta tensor an aten op returns (torch.load's tensors included)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out)
                          if isinstance(t, torch.Tensor) and not t.is_meta)
        return out


# -- ways to alter a folder ---------------------------------------------------------------------------

def recipe(edit):
    return lambda d: edit_recipe(d, edit)


def weights(edit):
    def apply(d):
        state = torch.load(d / "weights.pt", weights_only=True)
        torch.save(edit(state), d / "weights.pt")
    return apply


def insert(entry):
    """A node added before the output."""
    return recipe(lambda r: r["nodes"].insert(-1, {"args": {"tuple": []}, "kwargs": {"dict": {}}, **entry}))


def args(*values):
    return {"tuple": list(values)}


def rename(old, new):
    def edit(r):
        text = json.dumps(r).replace(f'"{old}"', f'"{new}"')
        r.clear()
        r.update(json.loads(text))
    return recipe(edit)


def archive(edit, name="weights.pt"):
    """Rewrite the zip archive entry by entry: edit(infos_and_data) -> list of (ZipInfo or name, bytes)."""
    def apply(d):
        with zipfile.ZipFile(d / name) as z:
            items = [(i, z.read(i)) for i in z.infolist()]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as out:
            for info, data in edit(items):
                out.writestr(info, data)
        (d / name).write_bytes(buf.getvalue())
    return apply


def deflate_bomb(items):
    prefix = items[0][0].filename.split("/")[0]
    info = zipfile.ZipInfo(f"{prefix}/data/99")
    info.compress_type = zipfile.ZIP_DEFLATED
    return [*items, (info, bytes(64 * 2**20))]  # 64 MB of zeros, 64 kB on disk


def overlapping_entries(d):
    """The stored-entry zip bomb: 2000 central-directory records of one 64 kB entry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data/0", bytes(65536))
    raw = buf.getvalue()
    start = raw.index(b"PK\x01\x02")
    end = raw.index(b"PK\x05\x06")
    record = raw[start:end]
    directory = record * 2000
    tail = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2000, 2000, len(directory), start, 0)
    (d / "weights.pt").write_bytes(raw[:start] + directory + tail)


def many_entries(items):
    return items + [(f"archive/junk/{i}", b"") for i in range(3000)]


def storage_header(edit):
    """Rewrite data.pkl's storage records (the numel of storage '0')."""
    def apply(items):
        return [(i, edit(data) if i.filename.endswith("data.pkl") else data) for i, data in items]
    return archive(apply)


def fifo(name):
    def apply(d):
        (d / name).unlink(missing_ok=True)
        os.mkfifo(d / name)
    return apply


def link(name, target):
    def apply(d):
        (d / name).unlink()
        (d / name).symlink_to(target)
    return apply


def with_constants(extra):
    """Turn 'mask' into a constant (constants.pt) and give constants.pt `extra` too."""
    def apply(d):
        state = torch.load(d / "weights.pt", weights_only=True)
        mask = state.pop("mask")
        torch.save(state, d / "weights.pt")
        torch.save({"mask": mask, **extra}, d / "constants.pt")
        edit_recipe(d, lambda r: r["attributes"]["mask"].update(kind="constant"))
    return apply


def as_format_2(d):
    """The recipe as nepenthe wrote it before recording dtypes (format /2, still readable)."""
    edit_recipe(d, lambda r: (r.pop("dtypes"), r.update(format="nepenthe.folded/2")))


def canary_payload(d):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {d.parent / 'CANARY'}",)
    state = torch.load(d / "weights.pt", weights_only=True)
    torch.save({**state, "payload": Payload()}, d / "weights.pt")


def write_through_view(r):
    r["nodes"].insert(-1, {"op": "call_method", "name": "tv", "target": "t", "args": args({"node": W}),
                           "kwargs": {"dict": {}}})
    r["nodes"].insert(-1, {**SET_W, "args": args({"node": "tv"}, 0, 1.0), "kwargs": {"dict": {}}})


W = "fc2_weight"
SET_W = {"op": "call_function", "name": "si", "target": "operator.setitem",
         "args": args({"node": W}, {"slice": [None, None, None]}, 0.0)}

CASES = {
    # names
    "node-self": (rename("act", "self"), "reserves"),
    "node-torch": (rename("mul_1", "torch"), "reserves"),
    "node-dunder": (rename("mul_1", "__class__"), "reserves"),
    "node-builtin": (rename("mul_1", "getattr"), "reserves"),
    "node-keyword": (rename("mul_1", "class"), "identifier"),
    "node-injection": (rename("mul_1", "m; import os"), "identifier"),
    "node-twice": (rename("mul_1", "mul"), "twice"),
    "input-self": (recipe(lambda r: node(r, "x").update(target="self")), "reserves"),
    "input-torch": (recipe(lambda r: node(r, "x").update(target="torch")), "reserves"),
    "input-injection": (recipe(lambda r: node(r, "x").update(target="x=__import__('os')")), "identifier"),
    "input-late": (recipe(lambda r: r["nodes"].insert(-1, dict(r["nodes"].pop(0)))), "before defining|first"),
    "module-path-dunder": (recipe(lambda r: r["modules"].update({"__class__": r["modules"]["fc1"]})), "dotted"),
    "attribute-path-quote": (recipe(lambda r: r["attributes"].update({'a"b': r["attributes"]["scale"]})), "dotted"),
    "kwarg-name": (recipe(lambda r: node(r, "sum_1")["kwargs"]["dict"].update({"__x": 1})), "reserves"),
    # targets
    "os-system": (recipe(lambda r: node(r, "mul").update(target="os.system")), "allow-list"),
    "eval": (recipe(lambda r: node(r, "mul").update(target="builtins.eval")), "allow-list"),
    "open": (recipe(lambda r: node(r, "mul").update(target="builtins.open")), "allow-list"),
    "import": (recipe(lambda r: node(r, "mul").update(target="builtins.__import__")), "allow-list"),
    "torch-load": (recipe(lambda r: node(r, "mul").update(target="torch.load")), "allow-list"),
    "target-not-str": (recipe(lambda r: node(r, "mul").update(target=["operator.mul"])), "allow-list"),
    "method-reduce": (recipe(lambda r: node(r, "view").update(target="__reduce_ex__")), "allow-list"),
    "method-hook": (recipe(lambda r: node(r, "view").update(target="register_hook")), "allow-list"),
    "getattr-class": (recipe(lambda r: node(r, "getattr_1")["args"]["tuple"].__setitem__(1, "__class__")),
                      "reads attribute"),
    "getattr-globals": (recipe(lambda r: node(r, "getattr_1")["args"]["tuple"].__setitem__(1, "__globals__")),
                        "reads attribute"),
    "get_attr-dunder": (recipe(lambda r: node(r, W).update(target="fc1.__class__")), "attribute"),
    "get_attr-module": (recipe(lambda r: node(r, W).update(target="fc1")), "neither in weights.pt"),
    "module-undeclared": (recipe(lambda r: node(r, "fc1").update(target="fc9")), "does not declare"),
    "module-class-os": (recipe(lambda r: r["modules"]["fc1"].update({"class": "os.system"})), "allow-list"),
    "module-from-original": (recipe(lambda r: r["modules"]["fc1"].update({"class": "<from original>",
                                                                          "type": "os.system"})), "original"),
    "function-from-original": (recipe(lambda r: node(r, "mul").update(target="<from original>os:system")),
                               "original"),
    "unknown-op": (recipe(lambda r: node(r, "mul").update(op="call_exec")), "unknown node op"),
    "arg-tag": (recipe(lambda r: node(r, "mul").update(args={"code": "print(1)"})), "malformed"),
    "dtype-by-name": (recipe(lambda r: node(r, "sum_1")["kwargs"]["dict"].update(dim={"dtype": "_dynamo"})),
                      "unknown dtype"),
    "undefined-node": (recipe(lambda r: node(r, "mul").update(args=args({"node": "later"}))), "before defining"),
    "cycle": (recipe(lambda r: node(r, "mul").update(args=args({"node": "add"}, 1))), "before defining"),
    # kwargs of modules
    "device-kwarg": (recipe(lambda r: r["modules"]["fc1"]["kwargs"].update(device="cpu", in_features=20000,
                                                                             out_features=20000)), "device"),
    "dtype-kwarg": (recipe(lambda r: r["modules"]["fc1"]["kwargs"].update(dtype="float64")), "dtype"),
    "huge-kwarg": (recipe(lambda r: r["modules"]["fc1"]["kwargs"].update(in_features=10**12)), "does not match"),
    "negative-kwarg": (recipe(lambda r: r["modules"]["fc1"]["kwargs"].update(out_features=-5)), "does not accept"),
    "unknown-kwarg": (recipe(lambda r: r["modules"]["fc1"]["kwargs"].update(pickle=1)), "does not accept"),
    "kwargs-list": (recipe(lambda r: r["modules"]["fc1"].update(kwargs=[1, 2])), "malformed arguments"),
    # attributes and declared dtypes
    "attribute-kind": (recipe(lambda r: r["attributes"]["scale"].update(kind="pickle")), "malformed description"),
    "attribute-shape": (recipe(lambda r: r["attributes"]["scale"].update(shape=[4])), "declares"),
    "attribute-huge": (recipe(lambda r: r["attributes"]["scale"].update(shape=[2**62, 2**62])), "declares"),
    "attribute-dtype": (recipe(lambda r: r["attributes"]["scale"].update(dtype="float64")), "declares"),
    "missing-constant": (recipe(lambda r: r["attributes"].update(c={"kind": "constant", "shape": [1],
                                                                    "dtype": "float32"})), "constants.pt"),
    "dtypes-missing": (recipe(lambda r: r.pop("dtypes")), "dtypes"),
    "format-2-mixed-floats": (lambda d: (as_format_2(d), weights(lambda s: {**s, "scale": s["scale"].double()})(d)),
                              "mixes"),
    "dtypes-complex": (recipe(lambda r: r["dtypes"].update(scale="complex64")), "dtypes"),
    "dtypes-other": (recipe(lambda r: r["dtypes"].update(scale="float64")), "float64"),
    "dtypes-extra": (recipe(lambda r: r["dtypes"].update(ghost="float32")), "different tensors"),
    "format": (recipe(lambda r: r.update(format="nepenthe.folded/99")), "not a nepenthe"),
    # broken graphs
    "no-output": (recipe(lambda r: r["nodes"].pop()), "0 output nodes"),
    "two-outputs": (recipe(lambda r: r["nodes"].append(dict(r["nodes"][-1]))), "2 output nodes"),
    "output-returns-none": (recipe(lambda r: r["nodes"][-1].update(args=args(None))), "returns no tensor"),
    "output-returns-str": (recipe(lambda r: r["nodes"][-1].update(args=args("os.system"))), "not constants"),
    "setitem-weight": (insert(SET_W), "writes into the stored tensor 'fc2.weight'"),
    "setitem-view": (recipe(write_through_view), "writes into the stored tensor 'fc2.weight'"),
    "iadd-weight": (insert({"op": "call_function", "name": "ia", "target": "operator.iadd",
                            "args": args({"node": "scale"}, 1.0)}), "writes into"),
    "mul_-weight": (insert({"op": "call_method", "name": "m_", "target": "mul_", "args": args({"node": W}, 2.0)}),
                    "writes into"),
    "relu-inplace-weight": (insert({"op": "call_function", "name": "r_", "target": "F.relu",
                                    "args": args({"node": W}), "kwargs": {"dict": {"inplace": True}}}), "writes into"),
    "out-kwarg-weight": (insert({"op": "call_function", "name": "o_", "target": "torch.add",
                                 "args": args({"node": "x"}, 1.0), "kwargs": {"dict": {"out": {"node": W}}}}),
                         "writes into"),
    # sizes, links, special files, zip bombs
    "recipe-huge": (lambda d: os.truncate(d / "recipe.json", 65 * 2**20), "bytes, over"),
    "recipe-deep": (lambda d: (d / "recipe.json").write_text("[" * 100_000), "not valid JSON"),
    "recipe-link-out": (link("recipe.json", "/etc/hostname"), "points outside"),
    "weights-dev-zero": (link("weights.pt", "/dev/zero"), "points outside"),
    "weights-fifo": (fifo("weights.pt"), "FIFO"),
    "weights-dir": (lambda d: ((d / "weights.pt").unlink(), (d / "weights.pt").mkdir()), "directory"),
    "weights-missing": (lambda d: (d / "weights.pt").unlink(), "missing"),
    "weights-truncated": (lambda d: os.truncate(d / "weights.pt", 1000), "zip end record"),
    "weights-comment": (lambda d: (d / "weights.pt").write_bytes((d / "weights.pt").read_bytes() + b"x"),
                        "zip end record"),
    "zip-deflate-bomb": (archive(deflate_bomb), "compressed entries"),
    "zip-overlap-bomb": (overlapping_entries, "entries"),
    "zip-many-entries": (archive(many_entries), "entries"),
    "storage-size": (storage_header(lambda b: b.replace(b"K\x03t", b"K\x30t", 1)), "bytes, not the"),
    # hostile weights
    "weights-float64": (weights(lambda s: {**s, "fc1.weight": s["fc1.weight"].double()}), "float64"),
    "weights-complex": (weights(lambda s: {**s, "fc1.weight": s["fc1.weight"].to(torch.complex64)}), "Complex"),
    "weights-int": (weights(lambda s: {**s, "fc1.weight": s["fc1.weight"].long()}), "int64"),
    "weights-sparse": (weights(lambda s: {**s, "fc1.bias": torch.sparse_coo_tensor(
        torch.tensor([[0, 5000]]), torch.tensor([1.0, 2.0]), (8,), check_invariants=False)}), "sparse"),
    "weights-quantized": (weights(lambda s: {**s, "fc1.bias": torch.quantize_per_tensor(
        s["fc1.bias"], 0.1, 0, torch.qint8)}), "quantized"),
    "weights-shared": (weights(lambda s: {**s, "fc1.bias": s["fc1.weight"].view(-1)[:8]}), "view"),
    "weights-offset": (weights(lambda s: {**s, "fc2.bias": torch.arange(4.0)[1:]}), "view"),
    "weights-shape": (weights(lambda s: {**s, "fc1.weight": torch.zeros(8, 7)}), "does not match"),
    "weights-not-tensor": (weights(lambda s: {**s, "fc1.weight": 3}), "dict of named tensors"),
    "weights-payload-canary": (canary_payload, "plain tensors"),
    "constants-sparse": (with_constants({"x": torch.eye(2).to_sparse()}), "sparse"),
    "constants-undeclared": (lambda d: (with_constants({"..": torch.ones(1)})(d), as_format_2(d)), "does not declare"),
    "constants-fifo": (lambda d: (with_constants({})(d), fifo("constants.pt")(d)), "FIFO"),
}


def test_the_corpus_is_large():
    assert len(CASES) >= 75


def test_the_seed_and_its_constants_variant_load(base, tmp_path):
    directory, x, expected = base
    assert torch.equal(nepenthe.load(directory)(x), expected)
    variant = copy_saved(directory, tmp_path / "c")
    with_constants({})(variant)
    assert torch.equal(nepenthe.load(variant)(x), expected)


@pytest.mark.parametrize("case", CASES)
def test_tampered_folder_is_refused_fast_and_small(base, tmp_path, case):
    alter, match = CASES[case]
    directory = copy_saved(base[0], tmp_path / "t")
    alter(directory)
    counter = TensorBytes()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with counter, pytest.raises(RecipeError, match=match) as info:
            nepenthe.load(directory)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(info.value, NepentheError)
    assert seconds < LIMIT_S, f"{case}: {seconds:.2f} s"
    assert peak < LIMIT_BYTES, f"{case}: {peak / 2**20:.0f} MB of Python allocations"
    assert counter.bytes < LIMIT_BYTES, f"{case}: {counter.bytes / 2**20:.0f} MB of tensors"
    assert not (tmp_path / "CANARY").exists()
