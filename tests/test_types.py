"""mypy over the hand-written packages, as they are installed (`nnserve.*`).

The source folders map onto `nnserve.*` only through setuptools' `package-dir`, which mypy cannot
follow, so the test lays the same package out with symlinks and checks that.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("builder", "server", "client", "protos")


def test_mypy_finds_no_type_errors(tmp_path: Path) -> None:
    package = tmp_path / "nnserve"
    package.mkdir()
    for source in (ROOT / "cli").glob("*.py"):
        (package / source.name).symlink_to(source)
    for name in SUBPACKAGES:
        (package / name).symlink_to(ROOT / name, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "-p", "nnserve", "--ignore-missing-imports", "--follow-imports=silent",
         "--no-incremental", "--cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
