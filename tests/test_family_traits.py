"""Family traits live on the FamilySpec: outside the module that registers a family, no code
compares a family's name (a new family then needs no edit elsewhere to get them right)."""
import ast
import os

from conftest import REPO_ROOT
from megaponder.config import FAMILIES

PACKAGE = os.path.join(REPO_ROOT, "megaponder")
#: the modules that define and register the built-in families
FAMILY_MODULES = {os.path.join("models", name) for name in ("base.py", "ponder.py", "latent.py", "baselines.py")}


def _names(node) -> set:
    """Family names a compared expression spells out: "x" or ("x", "y")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & set(FAMILIES)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names(e) for e in node.elts)) if node.elts else set()
    return set()


def family_name_comparisons(source: str) -> list[tuple[int, set]]:
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            named = set().union(*(_names(n) for n in [node.left, *node.comparators]))
            if named:
                hits.append((node.lineno, named))
    return hits


def test_the_check_sees_a_comparison():
    assert family_name_comparisons('if cfg.model.family == "pause":\n    pass\n') == [(1, {"pause"})]
    assert family_name_comparisons('ok = f in ("ponderlm2", "ponderlm3")\n')[0][1] == {"ponderlm2", "ponderlm3"}
    assert family_name_comparisons('ok = spec.halting == "router"\n') == []


def test_no_family_name_comparisons_outside_the_family_modules():
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, PACKAGE)
            if not name.endswith(".py") or rel in FAMILY_MODULES:
                continue
            with open(path) as f:
                found += [f"megaponder/{rel}:{line} compares with {sorted(names)}"
                          for line, names in family_name_comparisons(f.read())]
    assert not found, ("declare the trait on the FamilySpec (megaponder/models/spec.py) "
                       "instead:\n" + "\n".join(found))
