"""Linters run as tests: pyflakes-class errors (undefined names, unused imports/variables, syntax)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (requirements/base.txt pins it)")
def test_ruff_pyflakes_clean():
    r = subprocess.run(["ruff", "check", "--select", "F,E9", "--output-format", "concise",
                        "edge_vlm_ros", "test", "launch"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
