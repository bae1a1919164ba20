"""Linters run as tests: ruff's default rules (pyflakes, pycodestyle errors) plus flake8-bugbear (B),
over the package, the tests, the launch files and the scripts.

B905 (zip without strict=) is left out: the package zips sequences of equal length by construction
(batch rows and their results), and a strict= on each would say nothing a test does not already
check. Every other finding is fixed or suppressed on its line with the reason.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (requirements/base.txt pins it)")
def test_ruff_defaults_and_bugbear_clean():
    scripts = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "scripts").iterdir())
               if p.is_file() and (p.suffix == ".py" or p.read_text(errors="replace").startswith("#!/usr/bin/env python"))]
    assert scripts, "no Python scripts found under scripts/"
    r = subprocess.run(["ruff", "check", "--extend-select", "B", "--ignore", "B905", "--output-format", "concise",
                        "edge_vlm_ros", "test", "launch", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
