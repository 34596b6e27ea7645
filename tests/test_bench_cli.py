"""``safekern bench`` end to end on the tiny model (smoke: 1 repetition, 8 tokens).

The CSV has per-schedule method cost and implementation overhead, P1 is judged for ``each``
only, and transformers is reported in its own P2 rows; the plot is written.
"""
import csv

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tqdm")


def test_bench_quick_writes_table_csv_and_plot(tmp_path, capsys):
    from safekern.cli import main

    assert main(["bench", "--quick", "--reps", "1", "--new-tokens", "8", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 torch thread(s)" in out and "cores" in out
    rows = list(csv.DictReader(open(tmp_path / "engine_tiny_cpu.csv")))
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"off", "each", "periodic(10)", "annealing", "first", "transformers"}
    assert by["each"]["P1"] in ("ok", "MISS")
    assert all(by[p]["P1"] == "" for p in ("off", "periodic(10)", "annealing", "first"))
    assert float(by["each"]["evals_per_step"]) == pytest.approx(1.0)
    assert float(by["first"]["evals_per_step"]) == 0.0 and float(by["first"]["method_cost"]) == 0
    for p in ("each", "periodic(10)", "annealing"):
        r = by[p]
        assert float(r["vs_off"]) == pytest.approx(
            1 + float(r["method_cost"]) + float(r["impl_overhead"]))
    assert by["transformers"]["P2"] in ("ok", "MISS") and by["transformers"]["vs_off"] == ""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "engine_tiny_cpu.png").stat().st_size > 0
