"""The repository stands alone, and the spec travels with the file people copy."""
import ast
import importlib
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in names]


def test_no_file_of_the_project_refers_to_files_outside_it():
    outside = "../" + "shared"  # (spelled in two pieces so that this file does not match itself)
    for path in tracked_files():
        if path.suffix in (".py", ".md", ".txt", ".sh", ".json", ".jsonl", ".toml", ".cfg", "") and path.is_file():
            assert outside not in path.read_text(errors="replace"), path.relative_to(ROOT)


def test_the_spec_imports_only_torch_hypothesis_pytest_egrsd_and_the_standard_library():
    tree = ast.parse((ROOT / "test_egrsd.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) <= {"torch", "hypothesis", "pytest", "egrsd"}


def test_the_spec_runs_in_a_folder_that_holds_only_egrsd_and_itself(tmp_path):
    for name in ("egrsd.py", "test_egrsd.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_egrsd.py", "-k",
                          "bad_input or contracts_order"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["egrsd.py", "test_egrsd.py"]


def test_ci_runs_exactly_the_install_and_test_commands_of_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install and test", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip().split("  #")[0].strip() for line in section.splitlines() if line.startswith("    ")]
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == commands


@pytest.mark.parametrize("module, extra, error", [("integrations.trl_egrsd", "trl", ImportError),
                                                  ("tools.plot_runs", "matplotlib", SystemExit)])
def test_a_tool_whose_optional_extra_is_missing_says_which_and_how_to_install_it(module, extra, error, monkeypatch):
    monkeypatch.setitem(sys.modules, extra, None)  # (None: "import extra" raises ModuleNotFoundError)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(error, match=f"{extra}, an optional extra.*pip install -r requirements-extras.txt"):
        importlib.import_module(module)


def test_the_trl_script_without_trl_stops_with_the_reason_alone(monkeypatch):
    """Run as a script, one line (as every other missing extra gives), not an ImportError's traceback."""
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(SystemExit, match=r"^integrations/trl_egrsd.py needs trl, an optional extra .*pip install -r"):
        runpy.run_path(str(ROOT / "integrations" / "trl_egrsd.py"), run_name="__main__")


def test_methods_table_of_functions_names_every_public_name_of_egrsd_in_the_files_order():
    """docs/METHOD.md says "The functions, in the file's order": a reader walks the file with it."""
    import egrsd

    table = (ROOT / "docs/METHOD.md").read_text().split("The functions, in the file's order:", 1)[1].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = [n for row in rows for n in re.findall(r"`([A-Za-z_]+)[(`]", row.split(" | ")[0]) if hasattr(egrsd, n)]
    line = {node.name if hasattr(node, "name") else node.targets[0].id: node.lineno
            for node in ast.parse((ROOT / "egrsd.py").read_text()).body if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))}
    assert sorted(names) == sorted(egrsd.__all__)
    assert names == sorted(names, key=line.__getitem__)
