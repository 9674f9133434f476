"""The layers of docs/architecture.md hold: the import contracts in pyproject.toml pass, and they would
catch a wrong-way import (the check is not vacuous)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command as lint; lint()"]


def test_the_import_contracts_are_kept() -> None:
    result = subprocess.run(LINT, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" not in result.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_a_lower_layer_importing_a_higher_one_breaks_the_contracts(tmp_path: Path) -> None:
    subprocess.run(["cp", "-r", str(ROOT / "slurmproxy"), str(ROOT / "pyproject.toml"), str(tmp_path)], check=True)
    wrong = tmp_path / "slurmproxy" / "core" / "paths.py"
    wrong.write_text(wrong.read_text() + "\nfrom slurmproxy.pipeline import proxy as _upward  # noqa: E402,F401\n")
    result = subprocess.run(
        LINT, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False, env={"PYTHONPATH": str(tmp_path)}
    )
    assert result.returncode != 0
    assert "slurmproxy.core.paths -> slurmproxy.pipeline" in result.stdout
