"""The library and the harness are two rooms (python/kvtier/harness/__init__.py): nothing an
engine embeds imports what measures it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kvtier

ROOT = Path(kvtier.__file__).parent


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_library_modules_never_import_the_harness() -> None:
    library = [p for p in ROOT.rglob("*.py") if "harness" not in p.relative_to(ROOT).parts and p.name != "cli.py"]
    assert len(library) > 20, library  # the walk found the package
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("kvtier.harness"))
                 for p in library}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_kvtier_loads_no_harness_module() -> None:
    code = "import sys, kvtier, kvtier.cluster, kvtier.integrations; print(sorted(m for m in sys.modules if 'harness' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
