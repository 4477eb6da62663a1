"""Shared fixtures. The reference outputs live beside the repository, in ../shared/reference."""

from __future__ import annotations

from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official reference files; a missing directory fails the tests, never skips them.

    Parity with the official implementation is the point of this project, so a run that
    cannot see the reference must not look green.
    """
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.fail(f"reference files not found at {REFERENCE_DIR}: the tests expect the "
                    "repository checked out next to 'shared/' (…/shared/reference)")
    return REFERENCE_DIR
