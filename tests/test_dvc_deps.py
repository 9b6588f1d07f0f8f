"""dvc.yaml declares what each stage runs: no code change may leave a stale output.

For every stage, the project modules its command can import — at import time and inside any
function, followed module by module — must be covered by the stage's deps (the file or a folder
above it). The params each stage reads are checked while it runs, in tests/test_e2e.py.
"""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tinyllm", "stages")


def load_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, dict]:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def stage_script(stage: dict) -> Path:
    """`python -m stages.prepare` → stages/prepare.py."""
    words = stage["cmd"].split()
    assert words[:2] == ["python", "-m"], f"cmd {stage['cmd']!r} is not `python -m stages.<name>`"
    return ROOT / (words[2].replace(".", "/") + ".py")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The project file that module `name` is (None for another package's module)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports, anywhere in the file (top level, functions, branches), as dotted
    names; `from a import b` also names `a.b` in case b is a module."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def runs_code(path: Path) -> bool:
    """False for a package marker that holds only a docstring (importing it runs nothing)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def code_closure(script: Path, root: Path = ROOT) -> set[Path]:
    """The project files that running `script` can execute: its imports, theirs, ... and the
    package __init__ files on the way."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path, root):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
                found = module_file(".".join(parts[:depth]), root)
                if found is not None and found not in seen:
                    todo.append(found)
    return {p for p in seen if p.name != "__init__.py" or runs_code(p)}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def uncovered_code(stages: dict[str, dict], root: Path = ROOT) -> list[str]:
    """`stage: file` for each project file a stage can run that its deps do not cover."""
    problems = []
    for name, stage in stages.items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        for path in sorted(code_closure(stage_script(stage), root)):
            rel = path.relative_to(root).as_posix()
            if not covered(rel, deps):
                problems.append(f"{name}: {rel}")
    return problems


def test_imports_are_followed_into_functions_and_packages(tmp_path):
    (tmp_path / "tinyllm/sub").mkdir(parents=True)
    (tmp_path / "tinyllm/__init__.py").write_text('"""only a docstring"""\n')
    (tmp_path / "tinyllm/sub/__init__.py").write_text("from tinyllm.sub import leaf\n")
    (tmp_path / "tinyllm/sub/leaf.py").write_text("X = 1\n")
    (tmp_path / "tinyllm/lazy.py").write_text("def f():\n    from .sub.leaf import X\n    return X\n")
    (tmp_path / "tinyllm/unused.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/s.py").write_text("import json\nfrom tinyllm import lazy\n")
    files = {p.relative_to(tmp_path).as_posix() for p in code_closure(tmp_path / "stages/s.py", tmp_path)}
    assert files == {"stages/s.py", "tinyllm/lazy.py", "tinyllm/sub/__init__.py", "tinyllm/sub/leaf.py"}


def test_every_stage_lists_the_code_it_runs():
    problems = uncovered_code(load_stages())
    assert not problems, "dvc.yaml deps miss code the stage runs:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("stage", sorted(load_stages()))
def test_deps_name_existing_paths(stage):
    """A dep that names nothing (a renamed module) protects nothing."""
    for dep in load_stages()[stage].get("deps", []):
        dep = dep if isinstance(dep, str) else next(iter(dep))
        if not dep.startswith("artifacts/") and not dep.startswith("reports/"):  # outputs of earlier stages
            assert (ROOT / dep).exists(), f"{stage}: dep {dep} does not exist"


def test_the_committed_lock_matches_the_committed_params_and_code():
    """dvc.lock records the params and code files each stage ran with. Where it drifts from them (a
    text edit of the lock once turned `vocab_size: 2048` into 4568), `dvc status` on a clone reports
    stages as changed that are not, and `dvc repro` reruns them. Files only: a folder's hash (like
    tinyllm/model's) is DVC's own listing format, left to `dvc status`."""
    import hashlib

    from dvc.utils.serialize import load_yaml  # YAML 1.2, as DVC writes the lock (PyYAML reads 1e-05 as a string)

    params = load_yaml(ROOT / "params.yaml")
    lock = load_yaml(ROOT / "dvc.lock")["stages"]
    problems = []
    for name, stage in lock.items():
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            current = params
            for part in key.split("."):
                current = current[part]
            if current != value:
                problems.append(f"{name}: param {key} is {current!r} in params.yaml, {value!r} in dvc.lock")
        for dep in stage["deps"]:
            file = ROOT / dep["path"]
            code = file.is_file() and not dep["path"].startswith(("artifacts/", "reports/"))
            if code and hashlib.md5(file.read_bytes()).hexdigest() != dep["md5"]:
                problems.append(f"{name}: {dep['path']} changed since dvc.lock was written")
    assert not problems, "update dvc.lock (dvc repro, or commit the stages' deps):\n  " + "\n  ".join(problems)

