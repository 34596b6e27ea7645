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
    captured = capsys.readouterr()
    out = captured.out
    assert "1 torch thread(s)" in out and "cores" in out
    # Words in the table, the CSV's short names unchanged; a noise estimate beside each ratio
    # (one rep: no spread to measure, "±?").
    assert "time vs safety off" in out and "other overhead" in out and "±?" in out
    assert "loading model tiny" in captured.err and "C++ kernels" in captured.err
    rows = list(csv.DictReader(open(tmp_path / "engine_tiny_cpu.csv")))
    assert {(r["new_tokens"], r["reps"]) for r in rows} == {("8", "1")}   # explicit beats --quick
    by = {r["provider"]: r for r in rows}
    assert by["each"]["vs_off_noise"] == "nan"
    assert set(by) == {"off", "each", "periodic(10)", "annealing", "first", "transformers"}
    assert by["each"]["P1"] in ("ok", "MISS")           # one rep: never inconclusive
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


@pytest.mark.parametrize("ratio, impl, noise, verdict", [
    (1.10, 0.04, 0.01, "ok"),
    (1.20, 0.04, 0.01, "MISS"),                  # vs_off misses by 0.05, noise 0.01
    (1.12, 0.08, 0.01, "MISS"),                  # overhead misses by 0.03
    (1.12, 0.08, 0.04, "inconclusive"),          # ... by less than the noise
    (1.30, 0.04, 0.06, "MISS"),                  # noisy, but the miss is larger still
    (1.20, 0.04, float("nan"), "MISS"),          # one rep: no noise estimate excuses a miss
])
def test_p1_verdict_is_inconclusive_only_when_the_miss_is_within_the_noise(ratio, impl, noise,
                                                                           verdict):
    from safekern.evaluation.bench import p1_verdict, verdict_text

    assert p1_verdict(ratio, impl, noise, target=1.15) == verdict
    if verdict == "inconclusive":
        assert verdict_text(verdict, 0.06) == "inconclusive: noise larger than the budget"
        assert verdict_text(verdict, 0.04) == "inconclusive: noise larger than the miss"


def test_ratio_noise_is_half_the_p20_p80_spread_of_paired_ratios():
    from safekern.evaluation.bench import ratio_noise

    assert ratio_noise([1.0, 1.1, 1.2, 1.3, 1.4], [1.0] * 5) == pytest.approx(0.12)
    assert ratio_noise([2.0, 4.0], [2.0, 4.0]) == 0                # load moved both: no noise


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_bench_vllm_refuses_a_probe_threshold_outside_0_1(value, capsys):
    from safekern.evaluation import bench_vllm

    with pytest.raises(SystemExit) as e:              # before vLLM is even imported
        bench_vllm.main(["--probe-threshold", value])
    assert e.value.code == 2
    assert "--probe-threshold must be in [0, 1]" in capsys.readouterr().err
