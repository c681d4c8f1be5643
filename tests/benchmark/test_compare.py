"""The provider-comparison harness every benchmark script uses: rows of one schema, errors kept as
rows, the markdown table and the CSV round trip."""

from __future__ import annotations

import pytest
import torch

from nepenthe import benchmark as nb


def test_rows_time_every_provider_against_the_reference(tmp_path):
    x = torch.randn(256, 256)
    rows = nb.compare_providers("matmul", {"torch_mm": lambda: x @ x, "nepenthe_mm": lambda: torch.mm(x, x)},
                                suite="unit", repeats=3, warmup=1, threads=1, nbytes=x.numel() * 4, dtype="fp32")
    assert [r["provider"] for r in rows] == ["torch_mm", "nepenthe_mm"]
    ours = rows[1]
    assert ours["relative"] == 1.0  # the first provider named nepenthe* is the reference
    assert rows[0]["relative"] == pytest.approx(rows[0]["median_ms"] / ours["median_ms"])
    for r in rows:
        assert set(nb.MEASUREMENT_COLUMNS) <= set(r) and r["dtype"] == "fp32" and r["error"] is None
        assert r["gb_per_s"] == pytest.approx(x.numel() * 4 / (r["median_ms"] * 1e-3) / 1e9)
        assert r["min_ms"] <= r["median_ms"] and r["threads"] == 1 and r["repeats"] == 3
    table = nb.markdown_table(rows)
    assert table.splitlines()[0] == "| provider | median ms (IQR) | time / reference | GB/s |"
    assert "| nepenthe_mm |" in table
    path = nb.write_measurements(rows, tmp_path / "m.csv", ["dtype"])
    back = nb.read_measurements(path)
    assert [b["provider"] for b in back] == ["torch_mm", "nepenthe_mm"] and back[0]["dtype"] == "fp32"
    assert back[1]["median_ms"] == pytest.approx(ours["median_ms"]) and back[1]["threads"] == 1
    assert not (tmp_path / "m.csv.tmp").exists()


def test_a_failing_provider_gives_an_error_row():
    def broken():
        raise RuntimeError("no kernel for this\nsecond line")

    rows = nb.compare_providers("broken", {"nepenthe": broken, "torch": lambda: None}, repeats=1, warmup=0)
    assert len(rows) == 1 and rows[0]["provider"] == "*"
    assert rows[0]["error"] == "RuntimeError: no kernel for this" and rows[0]["median_ms"] is None
    assert "error: RuntimeError" in nb.markdown_table(rows)


def test_reading_a_file_of_another_schema_is_refused(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("case,provider,median_ms\nx,y,1.0\n")
    with pytest.raises(ValueError, match="not a measurement file"):
        nb.read_measurements(other)
