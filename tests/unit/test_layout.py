"""The import direction of the package: HTTP on top, the database and settings at the bottom.

``api → domain services → ledger → models and helpers → db → config``: a
module may import its own layer and the layers below it, never one above.
Read from the source (no import runs), so a new module that is in no layer
fails here until someone decides where it belongs.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hoardrun"

#: Top to bottom. ``api`` stands for every module under hoardrun/api/.
LAYERS = (
    ("api", {"api"}),
    ("services", {"accounts", "admin", "auth", "cards", "health", "history", "holds",
                  "idempotency",
                  "investments", "movements", "users", "sample", "backup", "verification"}),
    ("ledger", {"ledger", "chain"}),
    ("models", {"models", "schema", "audit", "cursors", "ids", "security", "text", "mail",
                "roles"}),
    ("db", {"db", "embedded", "replicas"}),
    ("base", {"config", "errors", "money", "clock", "__init__"}),
)


def _name(path):
    """``hoardrun/api/cards.py`` -> ``api``; ``hoardrun/ledger.py`` -> ``ledger``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "api" if parts[0] == "api" else parts[0]


def _layer(name):
    for depth, (_, members) in enumerate(LAYERS):
        if name in members:
            return depth
    raise AssertionError(f"hoardrun/{name} is in no layer of tests/unit/test_layout.py")


def _imports(path):
    """The top-level hoardrun modules ``path`` imports (``api`` for any of hoardrun.api)."""
    in_api = path.parent.name == "api"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            # "from ." inside api/ is api itself; "from .." or "from ." elsewhere is the package.
            up = node.level - (1 if in_api else 0)
            if up == 0:
                found.add("api")
                continue
            names = [node.module] if node.module else [a.name for a in node.names]
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hoardrun"):
            rest = node.module.split(".")[1:]
            found.update([rest[0]] if rest else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] if "." in a.name else "__init__"
                         for a in node.names if a.name.startswith("hoardrun"))
    return {("__init__" if n == "__version__" else n) for n in found}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_imports_a_layer_above_its_own(path):
    mine = _layer(_name(path))
    upward = sorted(n for n in _imports(path) if _layer(n) < mine)
    assert not upward, (f"{path.relative_to(PACKAGE.parent)} ({LAYERS[mine][0]}) imports "
                        f"{upward} from a layer above it")


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser really reports what a domain module importing the HTTP layer looks like."""
    offender = tmp_path / "ledger.py"
    offender.write_text("from .api import app\nfrom . import db\n")
    assert _imports(offender) == {"api", "db"}
    assert _layer("api") < _layer("ledger") < _layer("db")
