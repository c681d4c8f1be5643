"""FSDP2 models whose rectifiers are functional calls (tests/distributed/scenarios_functional_fsdp.py):
measured on 2 gloo ranks through the model's own forward (nepenthe/entropy/functional.py), they give
the one-process graph route's call site names and int64 histograms bit for bit, and NEPENTHE's step
the one-process masks."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import equal, launch, ok

MODULE = "tests.distributed.scenarios_functional_fsdp"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict[str, list[dict]]]:
    """2 FSDP2 ranks; the one-process reference runs here (no process group: unsharded, one shard)."""
    from tests.distributed import scenarios_functional_fsdp as scenarios

    base = tmp_path_factory.mktemp("functional_fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        single = {s.__name__: [{"ok": s()}] for s in scenarios.SCENARIOS}
    finally:
        torch.set_num_threads(threads)
    return {0: single, 2: launch(2, base / "world2", module=MODULE)}


def test_functional_rectifiers_of_an_fsdp2_model_are_measured_as_in_one_process(runs):
    single = ok(runs[0]["functional_measure"][0])
    assert single["names"] == ["relu()", "blocks.0.relu()", "blocks.1.relu()", "act", "relu()#1"]
    assert single["sites"]["blocks.1.relu()"][2] == "blocks.1.fc"  # its producer, from the structure graph
    for r, result in enumerate(runs[2]["functional_measure"]):
        equal(ok(result), single, f"rank {r}")


def test_nepenthe_step_on_an_fsdp2_model_with_functional_rectifiers_gives_the_one_process_masks(runs):
    single = ok(runs[0]["functional_prune_step"][0])
    assert sum(single["pruned"].values()) > 0
    assert {"fc1", "blocks.0.fc", "blocks.1.fc", "fc3"} <= {k for k, n in single["pruned"].items() if n}
    for r, result in enumerate(runs[2]["functional_prune_step"]):
        equal(ok(result), single, f"rank {r}")
