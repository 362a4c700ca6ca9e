"""Write the measured tables into docs/benchmarks.md from bench/results/*.json.

Each benchmark module has a `markdown(result)` function; its table goes between the
markers `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` of docs/benchmarks.md, and the
prose around the markers stays as written. A result file that is missing leaves its
section as it is. `make bench` runs this last.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the scripts import bench/common.py as `common`
DOC = BENCH.parent / "docs" / "benchmarks.md"
SECTIONS = ("store", "stages", "training", "scaling")  # bench/<name>.py, results/<name>.json


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


def main() -> None:
    doc = DOC.read_text()
    for name in SECTIONS:
        result = BENCH / "results" / f"{name}.json"
        if not result.is_file():
            print(f"{result}: not measured yet; section {name} left as it is", file=sys.stderr)
            continue
        table = module(name).markdown(json.loads(result.read_text()))
        doc = replace_section(doc, name, table)
        print(f"docs/benchmarks.md: {name} from {result.relative_to(BENCH.parent)}")
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(doc)
    tmp.replace(DOC)


if __name__ == "__main__":
    main()
