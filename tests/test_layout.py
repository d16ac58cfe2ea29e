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


def test_lock_pins_every_dependency_within_its_range():
    """requirements.lock (what every make target installs) holds one exact version of each
    dependency of pyproject.toml, runtime and extras, inside the range pyproject allows: a
    dependency added or a range changed without `make lock` fails here."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not name==version"
            lock[canonicalize_name(name)] = version
    reqs = [*project["dependencies"], *(r for rs in project["optional-dependencies"].values()
                                        for r in rs)]
    problems = []
    for text in reqs:
        r = Requirement(text)
        if canonicalize_name(r.name) == "pgasr":
            continue  # the dev extra includes the serve extra
        v = lock.get(canonicalize_name(r.name))
        if v is None or not r.specifier.contains(v, prereleases=True):
            problems.append(f"{text}: locked {v}")
    assert not problems, "run `make lock`: " + "; ".join(problems)
    assert "pandas" not in [canonicalize_name(Requirement(t).name) for t in reqs]  # unused
    make = (ROOT / "Makefile").read_text()
    assert make.count("-c $(LOCK) -e") == 2  # runtime and dev installs both use the lock
