"""The launcher must start without the training stack: checked in a fresh interpreter (indirect imports too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "accelerate", "litellm")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("HEAVY:"), out.stdout
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def test_import_launcher_is_light() -> None:
    assert _loaded_after("import launcher, launcher.cli, trainer, trainer.config") == []


def test_launcher_help_is_light() -> None:
    code = "import sys\nsys.argv=['launcher','--help']\nfrom launcher.cli import app\ntry:\n    app()\nexcept SystemExit:\n    pass"
    assert _loaded_after(code) == []


def test_launcher_validate_is_light() -> None:
    code = (
        "import sys\nsys.argv=['launcher','validate','configs/quickstart.yaml']\nfrom launcher.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass"
    )
    assert _loaded_after(code) == []
