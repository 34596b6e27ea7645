"""What a user reads first: ``safekern --help`` per subcommand and ``safekern info``."""
import json

import pytest

import safekern
from safekern.cli import main

SUBCOMMANDS = ("bench", "info", "train", "demo", "serve")


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [(), *((c,) for c in SUBCOMMANDS)])
def test_help_has_no_markup_and_every_option_says_what_it_does(capsys, argv):
    text = _help(capsys, *argv)
    assert "``" not in text and "`" not in text
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    for opt in options:
        block = text.split(f"\n  {opt}", 1)[1].split("\n  -", 1)[0]
        assert len(block.split()) > 2, f"{argv} {opt} has no help text"


def test_help_states_defaults(capsys):
    assert "(default: 300)" in " ".join(_help(capsys, "train").split())      # --steps
    bench = " ".join(_help(capsys, "bench").split())     # argparse wraps lines
    assert "(default: auto)" in bench and "(default: cpu 1 4, cuda 1 16 64; --quick: 1)" in bench


def test_info_says_available_or_why_not(capsys):
    report = safekern.info("cpu")
    assert report["backends"]["ess_attention"]["torch"] == "available"
    for op in report["backends"].values():
        for why in op.values():
            assert isinstance(why, str) and why
    assert all(isinstance(v, str) for v in report["versions"].values())
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "null" not in printed and set(json.loads(printed)) == set(report)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"safekern {safekern.__version__}"


@pytest.mark.parametrize("argv", [(), *((c,) for c in SUBCOMMANDS)])
def test_help_cites_no_file_a_wheel_lacks(capsys, argv):
    """An installed wheel has no docs/ or BENCHMARKS.md: --help must stand on its own."""
    assert ".md" not in _help(capsys, *argv)


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["bench", "--batch", "1", "x"], "argument --batch: expected an integer, got 'x'"),
    (["bench", "--new-tokens", "0"], "argument --new-tokens: must be >= 2, got 0"),
    (["bench", "--reps", "-1"], "argument --reps: must be >= 1"),
    (["bench", "--threads", "-2"], "argument --threads: must be >= 0"),
    (["bench", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["bench", "--model", "nonsense"], "argument --model: 'nonsense' is neither a known model"),
    (["bench", "--model", "smollm2", "--shape", "small"], "argument --shape: applies to --model "
                                                          "tiny"),
    (["bench", "--shape", "llama3-8b"], "argument --shape: llama3-8b is a GPU benchmark"),
    (["bench", "--backend", "cuda"], "argument --backend: cuda cannot run on cpu: needs --device "
                                     "cuda"),
    (["demo", "--model", "tiny", "--backend", "cuda"], "argument --backend: cuda cannot run on "
                                                       "cpu"),
    (["demo", "--model", "nonsense"], "argument --model: 'nonsense' is neither a known model"),
    (["demo", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be >= 1, got -3"),
    (["demo", "--per-kind", "0"], "argument --per-kind: must be >= 1"),
    (["demo", "--delta", "/nonexistent"], "argument --delta: '/nonexistent' does not exist"),
    (["train"], "say what to train"),
    (["train", "--tiny", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["train", "--tiny", "--threads", "2"], "argument --threads: applies to a real model"),
    (["train", "--tiny", "--response-windows"], "argument --response-windows: applies to a real"),
    (["train", "--model", "smollm2", "--steps", "5"], "argument --steps: applies to the tiny"),
    (["train", "--model", "smollm2", "--rank", "0", "--seed", "1"],
     "argument --seed: applies to the adapter recipe"),
    (["train", "--model", "smollm2", "--probe-only", "--seed", "1"],
     "argument --seed: not allowed with --probe-only"),
    (["train", "--model", "smollm2", "--tiny"], "argument --tiny: not allowed with --model"),
    (["train", "--tiny", "--lr", "1e-4"], "argument --lr: applies to a real model"),
    (["train", "--model", "smollm2", "--lr", "0"], "argument --lr"),
    (["train", "--model", "smollm2", "--probe-only", "--epochs", "2"],
     "argument --epochs: not allowed with --probe-only"),
    (["train", "--model", "smollm2", "--delta", "x"], "argument --delta: applies to --probe-only"),
    (["train", "--tiny", "--probe-only"], "argument --probe-only: applies to a real model"),
    (["train", "--tiny", "--probe-unit", "answer"], "argument --probe-unit: applies to a real model"),
    (["train", "--tiny", "--val-split", "pattern"], "argument --val-split: applies to a real model"),
    (["train", "--model", "smollm2", "--val-split", "topic"], "argument --val-split: invalid choice"),
    (["train", "--model", "smollm2", "--rank", "0", "--val-split", "pattern"],
     "argument --val-split: applies to the adapter recipe"),
    (["train", "--model", "smollm2", "--probe-only", "--val-split", "pattern"],
     "argument --val-split: not allowed with --probe-only"),
    (["train", "--model", "smollm2", "--probe-unit", "position"], "argument --probe-unit: invalid choice"),
    (["train", "--model", "smollm2", "--rank", "0", "--probe-unit", "answer"],
     "argument --probe-unit: the screening probe is fitted with the adapter recipe"),
    (["export-vllm", "--out", "x", "--threshold", "1.5"], "argument --threshold: must be in "
                                                          "[0, 1], got 1.5"),
    (["export-vllm", "--out", "x", "--model", "tiny"], "export-vllm writes a pretrained"),
    (["cache"], "one of the arguments --list --clear is required"),
])
def test_bad_arguments_are_usage_errors_naming_the_option(capsys, tmp_path, monkeypatch, argv,
                                                          message):
    monkeypatch.chdir(tmp_path)
    err = _usage_error(capsys, argv)
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []              # nothing trained or written


def test_model_paths_are_checked_by_what_the_command_loads(capsys, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    delta = tmp_path / "delta"
    delta.mkdir()
    (delta / "safety.json").write_text("{}")
    # A local checkpoint with no delta given and none trained: demo / export-vllm say how to
    # get one (bench times it with a fresh head instead: tests/test_local_models.py).
    assert "argument --delta: no delta for the local checkpoint" in _usage_error(
        capsys, ["demo", "--model", str(checkpoint)])
    assert "safekern train --model" in _usage_error(
        capsys, ["export-vllm", "--model", str(gguf), "--out", str(tmp_path / "x")])
    assert "neither a known model" in _usage_error(capsys, ["demo", "--model", str(tmp_path)])
    assert "argument --delta: applies to a real model" in _usage_error(
        capsys, ["demo", "--model", "tiny", "--delta", str(delta)])
    assert "has no safety.json" in _usage_error(
        capsys, ["demo", "--delta", str(checkpoint)])
