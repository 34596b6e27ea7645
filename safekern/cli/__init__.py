"""Command line: ``safekern bench | info | train | demo | export-vllm | serve | cache``
(``main``, the console script; ``python -m safekern.cli`` runs it too). ``parser`` builds the
options, ``commands`` implements them, ``demo`` is ``safekern demo``'s side by side; ``DESCRIPTION``
is what --help says.

Every argument is checked here, by argparse (types, ranges, choices, paths that must exist): a bad
value ends in a usage error (exit 2) that names the option, before anything loads or trains, and a
value the user gave is used as given or refused, never replaced by a default. The top layer: may
import anything in safekern; nothing imports it."""
from __future__ import annotations

import sys
from typing import List, Optional

from .parser import DESCRIPTION, build_parser


def main(argv: Optional[List[str]] = None) -> int:
    """The ``safekern`` console script: parse ``argv`` (default ``sys.argv[1:]``), run the
    subcommand, return its exit code."""
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = []
    if "--" in argv:                      # serve: what follows goes to vLLM as it is
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args = p.parse_args(argv)
    if args.cmd != "serve" and passed:
        args.parser.error(f"unrecognized arguments after '--': {' '.join(passed)} (only "
                          "serve passes arguments through)")
    args.vllm_args = passed
    return args.fn(args)


__all__ = ["main", "DESCRIPTION"]
