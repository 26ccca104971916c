"""`make install` builds the project with setuptools: its metadata must not trigger deprecation warnings (a TOML
table `project.license` did) and must declare the license file it ships."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_with_its_file_and_a_setuptools_that_reads_it():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "Apache-2.0"  # PEP 639: a string, not {text = ...}
    assert all((REPO / f).is_file() for f in project["license-files"])
    assert "setuptools>=77" in meta["build-system"]["requires"]  # the first setuptools to read PEP 639 metadata
