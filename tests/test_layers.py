"""The README's module map is the code's: every module is in it, and imports follow its layers.

The map (README, "Module map") puts each module of ``psprobe/`` in one group.  The
two pipelines never import each other: the sync side (mesh -> host set -> units)
and the collect side (archive -> messages -> broker -> checkpoint) meet only in
the shared leaves below them and in the records both leave for the operator.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "psprobe"

# What each group may import besides itself (imports inside functions count too).
ALLOWED = {
    "shared": set(),
    "sync": {"shared", "records"},
    "collect": {"shared", "records"},
    "records": {"shared"},
    "ops": {"shared", "records", "sync", "collect"},
    "cli": {"shared", "records", "sync", "collect", "ops"},
}


def module_map() -> dict[str, str]:
    """Module -> group, read from the README's module-map block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- module-map -->\n```\n(.*?)```", text, re.S)
    assert block, "README.md has no module-map block"
    groups: dict[str, str] = {}
    for line in block.group(1).splitlines():
        m = re.match(r"(\w+)\s{2,}(.+?)(?:\s{2,}|$)", line)
        if not m or m.group(1) not in ALLOWED:
            continue
        for name in re.split(r",\s*", m.group(2).strip()):
            assert name not in groups, f"{name} is in two groups of the module map"
            groups[name] = m.group(1)
    return groups


def imports(path: Path) -> set[str]:
    """The psprobe modules ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "psprobe":
            if node.module == "psprobe":
                found |= {a.name for a in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("psprobe.")}
    found.discard("__version__")
    return found - {path.stem}


def test_every_module_is_in_the_map_and_nothing_else():
    groups = module_map()
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert sorted(modules - set(groups)) == [], "modules missing from the README's module map"
    assert sorted(set(groups) - modules) == [], "the README's module map names modules that do not exist"


def test_imports_follow_the_layers():
    groups = module_map()
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        mine = groups[path.stem]
        for dep in sorted(imports(path)):
            theirs = groups.get(dep)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{path.stem} ({mine}) imports {dep} ({theirs})")
    assert wrong == []


def test_the_check_sees_an_import_across_the_pipelines(tmp_path):
    """The rule can fail: a sync-side module importing the collect side is caught."""
    bad = tmp_path / "units.py"
    bad.write_text("def f():\n    from psprobe import publish\n    return publish\n")
    assert imports(bad) == {"publish"}
    groups = module_map()
    assert groups["publish"] not in ALLOWED[groups["units"]]
