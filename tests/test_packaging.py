"""What the project installs from: pyproject.toml's ranges, and constraints.txt's pins that CI, the demo and
the Containerfile install with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from slurmproxy.config.reference import in_readme, table

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    match = _NAME.match(spec)
    assert match is not None, spec
    return _canonical(match.group(0))


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[_canonical(name)] = version
    return found


def test_every_dependency_of_the_project_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pinned = pins()
    assert not [spec for spec in wanted if _requirement_name(spec) not in pinned]


def test_everything_that_installs_uses_the_constraints() -> None:
    for script in ("scripts/test", "scripts/demo", "scripts/bench", "scripts/install-runtime"):
        assert "-c " in (ROOT / script).read_text() and "constraints.txt" in (ROOT / script).read_text(), script
    assert "constraints.txt" in (ROOT / "Containerfile").read_text()


def test_the_uvicorn_pin_is_inside_the_tested_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [s for s in project["dependencies"] if s.startswith("uvicorn")]
    low, high = re.findall(r"[<>]=?([0-9.]+)", spec)
    version = tuple(int(p) for p in pins()["uvicorn"].split("."))
    assert tuple(int(p) for p in low.split(".")) <= version < tuple(int(p) for p in high.split("."))


def test_the_readme_settings_table_is_generated_from_the_settings_model() -> None:
    readme = in_readme((ROOT / "README.md").read_text())
    assert readme is not None, "README.md lost its settings-table markers"
    assert readme == table(), "README.md's settings table is stale: paste `python -m slurmproxy.config.reference`"
