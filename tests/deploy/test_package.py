"""The wheel that ships: one top-level package, ``orchestrix``, the services inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def test_the_wheel_installs_only_the_orchestrix_package(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("orchestrix-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    # No `services` beside it: it would collide with users' own modules.
    assert top == {"orchestrix"}
    for service in ("api/app.py", "scheduler/service.py", "worker/consumer.py"):
        assert f"orchestrix/services/{service}" in names
    assert "orchestrix/migrations/versions/0004_workers_claim.py" in names
