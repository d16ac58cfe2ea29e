"""House rules that keep the architecture honest."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pgasr_never_imports_ray():
    offenders = []
    for f in (ROOT / "pgasr").rglob("*.py"):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"pgasr/ must not import ray: {offenders}"


def test_layout_exists():
    for d in ("pgasr", "tests", "configs"):
        assert (ROOT / d).is_dir(), d
    assert (ROOT / "pyproject.toml").is_file()
    assert (ROOT / ".ci" / "run").is_file()
