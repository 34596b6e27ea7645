"""Print a pip constraints file pinning every ``>=`` floor that pyproject.toml declares (the
dependencies and the test extra) to exactly that version, so CI can install the minimums."""
import pathlib
import re
import tomllib

pyproject = pathlib.Path(__file__).parents[1] / "pyproject.toml"
project = tomllib.loads(pyproject.read_text())["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    spec, _, marker = req.partition(";")
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", spec)
    if m:
        print(f"{m[1]}=={m[2]}" + (f"; {marker.strip()}" if marker else ""))
