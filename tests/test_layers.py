"""The package's architecture, as declared in .importlinter: the layers (errors < collectives <
config < models < {parallel, data, infer} < train < {evaluation, analysis, convert} < cli) and
no import cycle in any package, imports inside functions included; and the model core
(megaponder/models/, which the Hugging Face export copies) imports only torch, the standard
library and its own modules."""
import ast
import os
import sys

from conftest import REPO_ROOT

MODELS = os.path.join(REPO_ROOT, "megaponder", "models")
#: the export's wrapper may import transformers; nothing else in the core does
TRANSFORMERS_FILES = {"hf_model.py", "hf_config.py"}


def test_layers_and_no_cycles(monkeypatch, capsys):
    from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

    monkeypatch.chdir(REPO_ROOT)  # lint-imports reads .importlinter and imports from the cwd
    status = lint_imports(config_filename=os.path.join(REPO_ROOT, ".importlinter"), no_cache=True)
    report = capsys.readouterr().out
    assert status == EXIT_STATUS_SUCCESS, report
    assert "3 kept, 0 broken" in report


def core_import_problems(path: str) -> list[str]:
    """Imports of a models/ file that an export without megaponder could not satisfy:
    anything but torch, the standard library, flat relative imports of a sibling and (in the
    wrapper) transformers; an optional package is fine inside a ``try`` block, which
    transformers' loader skips when it checks the packages a file needs."""
    name = os.path.basename(path)
    allowed = set(sys.stdlib_module_names) | {"torch"} | (
        {"transformers"} if name in TRANSFORMERS_FILES else set())
    tree = ast.parse(open(path).read())
    in_try = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
              for stmt in t.body for n in ast.walk(stmt)}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > 1 or node.module is None:
                problems.append(f"{name}:{node.lineno} relative import must be 'from .sibling import ...'")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            tops = ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
            for top in (t.split(".")[0] for t in tops):
                if top not in allowed and id(node) not in in_try:
                    problems.append(f"{name}:{node.lineno} imports {top}")
    return problems


def test_model_core_is_portable():
    assert core_import_problems.__doc__   # the rule is documented where it is checked
    problems = [p for f in sorted(os.listdir(MODELS)) if f.endswith(".py")
                for p in core_import_problems(os.path.join(MODELS, f))]
    assert not problems, problems


def test_portable_core_check_sees_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import yaml\nfrom ..config import Config\nfrom . import x\n"
                   "try:\n    import flash_attn\nexcept ImportError:\n    pass\n"
                   "def f():\n    from transformers import AutoModel\n")
    assert [p.split(" ", 1)[1] for p in core_import_problems(str(bad))] == [
        "imports yaml", "relative import must be 'from .sibling import ...'",
        "relative import must be 'from .sibling import ...'", "imports transformers"]
