"""The package's architecture, as declared in .importlinter: the layers (errors/compat <
collectives < config < models < {parallel, data, infer} < train < {evaluation, analysis,
convert} < cli) and no import cycle in any package, imports inside functions included."""
import os

from conftest import REPO_ROOT


def test_layers_and_no_cycles(monkeypatch, capsys):
    from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

    monkeypatch.chdir(REPO_ROOT)  # lint-imports reads .importlinter and imports from the cwd
    status = lint_imports(config_filename=os.path.join(REPO_ROOT, ".importlinter"), no_cache=True)
    report = capsys.readouterr().out
    assert status == EXIT_STATUS_SUCCESS, report
    assert "2 kept, 0 broken" in report
