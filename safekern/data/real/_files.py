"""Where the real-data files live and how they are read and written: ``HERE`` (this folder),
``norm`` (the case/whitespace-insensitive key every duplicate test uses), JSON lines in and out,
and a group's rows with its ``*_more.jsonl`` rows (``_load_group``)."""

from __future__ import annotations

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _load_group(name):
    rows = _read_jsonl(os.path.join(HERE, name + ".jsonl"))
    more = os.path.join(HERE, name + "_more.jsonl")
    return rows + (_read_jsonl(more) if os.path.exists(more) else [])
