"""Bring your own model: safekern.models.load / `safekern train --model` on a local checkpoint
(a directory with config.json), offline, and the errors for anything else."""
import json
import os

import pytest

import safekern
from safekern import EssConfig, models
from tests.tiny_ess import save_random_qwen2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random Qwen2 chat model saved like any transformers checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "my-qwen"
    save_random_qwen2(path)
    return str(path)


def test_local_checkpoint_trains_and_generates(checkpoint, tmp_path):
    from safekern.training.real import train_real

    out = str(tmp_path / "delta")
    summary = train_real(checkpoint, out, rank=2, epochs=1, max_sequences=24, progress=False,
                         log=None)
    assert summary["out_dir"] == out and os.path.isfile(os.path.join(out, "safety.json"))
    assert models.model_label(checkpoint) == "my-qwen"
    model, tok = models.load(checkpoint, safety=out)
    assert model.config.model_type == "qwen2" and model.safety_adapter.rank == 2
    res = safekern.generate(model, tok, ["How do I bake bread?"], max_new_tokens=3)
    assert res[0].trace is not None and len(res[0].trace.p_unsafe) >= 1
    # The recorded operating point: the default one, its threshold and tau chosen on the
    # validation split (the calibration table is in the summary).
    chosen = summary["calibration"]["chosen"]
    assert len(summary["calibration"]["table"]) == 30 and chosen in summary["calibration"]["table"]
    assert model.safekern.operating_point == EssConfig(
        schedule="each", policy="high", refusal_text="Sorry, I can't help with that.",
        threshold=chosen["threshold"], tau=chosen["tau"])


def test_local_checkpoint_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no delta ships"):
        models.load(checkpoint, safety=True)
    with pytest.raises(ValueError, match="without config.json"):
        models.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' model"):
        models.load(str(tmp_path))
    with pytest.raises(ValueError, match="neither a known name"):
        models.load(str(tmp_path / "missing.gguf"))


def test_local_checkpoint_through_the_cli(checkpoint, tmp_path, capsys, monkeypatch):
    """demo / bench / export-vllm take a local checkpoint and its delta (--delta, or the one
    `safekern train --model PATH` wrote to its default place)."""
    from safekern.cli import main

    monkeypatch.setenv("SAFEKERN_CACHE", str(tmp_path / "cache"))
    default = models.trained_delta_dir(checkpoint)
    assert models.default_delta(checkpoint) is None
    assert main(["train", "--model", checkpoint, "--rank", "2", "--epochs", "1",
                 "--max-sequences", "16", "--no-progress", "--no-calibrate"]) == 0
    assert models.default_delta(checkpoint) == default
    assert main(["demo", "--model", checkpoint, "--per-kind", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert f"local checkpoint {checkpoint}" in out and default in out
    xdir = str(tmp_path / "export")
    assert main(["export-vllm", "--model", checkpoint, "--out", xdir]) == 0
    with open(os.path.join(xdir, "safety.json")) as f:
        meta = json.load(f)
    assert meta["adapter"]["rank"] == 2
    assert main(["bench", "--model", checkpoint, "--batch", "1", "--reps", "1",
                 "--new-tokens", "4", "--prompt-tokens", "8", "--no-progress", "--vllm", "off",
                 "--out", str(tmp_path / "bench")]) == 0
    assert "ESS delta " + default in capsys.readouterr().err
