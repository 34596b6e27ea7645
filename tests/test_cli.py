"""What a user reads first: ``safekern --help`` per subcommand and ``safekern info``."""
import json

import pytest

import safekern
from safekern.cli import main

SUBCOMMANDS = ("bench", "info", "train", "demo")


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
    assert "(default: 300)" in _help(capsys, "train")             # --steps
    bench = _help(capsys, "bench")
    assert "(default: auto)" in bench and "(default: cpu 1 4, cuda 1 16 64)" in bench


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
