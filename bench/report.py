"""Write the measured tables into docs/benchmarks.md from bench/results/*.json.

Each benchmark module has a `markdown(result)` function; its table goes between the
markers `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` of docs/benchmarks.md, and the
prose around the markers stays as written. A result file that is missing leaves its
section as it is, but for the sections of `NOT_RUN`, which then say so (the GPU check needs
a device machine, which only some sessions are lent). `make bench` runs this last.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

from alignment import atomic

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the scripts import bench/common.py as `common`

DOC = BENCH.parent / "docs" / "benchmarks.md"
SECTIONS = ("store", "stages", "training", "scaling", "gpu")  # bench/<name>.py, results/<name>.json
# Sections whose missing result is written as this line instead of leaving the section alone.
NOT_RUN = {"gpu": "not run: no device was lent to this session"}


def module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up there
    spec.loader.exec_module(loaded)
    return loaded


def replace_section(doc: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.DOTALL)
    if not pattern.search(doc):
        raise SystemExit(f"{DOC}: no <!-- bench:{name} --> ... <!-- /bench:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + table.rstrip("\n") + "\n" + m.group(2), doc)


def render(doc: str, results: Path = BENCH / "results") -> str:
    """``doc`` with each section's table from ``results/<name>.json``."""
    for name in SECTIONS:
        result = results / f"{name}.json"
        if not result.is_file() and name in NOT_RUN:
            doc = replace_section(doc, name, NOT_RUN[name])
            print(f"docs/benchmarks.md: {name}: {NOT_RUN[name]}")
            continue
        if not result.is_file():
            print(f"{result}: not measured yet; section {name} left as it is", file=sys.stderr)
            continue
        table = module(name).markdown(json.loads(result.read_text()))
        doc = replace_section(doc, name, table)
        shown = result.relative_to(BENCH.parent) if result.is_relative_to(BENCH.parent) else result
        print(f"docs/benchmarks.md: {name} from {shown}")
    return doc


def main() -> None:
    atomic.write_text(DOC, render(DOC.read_text()))


if __name__ == "__main__":
    main()
