"""Shared fixtures. The reference outputs live beside the repository, in ../shared/reference."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

# Before torch is imported (here and in subprocesses): OpenMP threads that spin while waiting
# make every step 10-50x slower when more threads than cores are runnable, as on a shared
# 2-core machine running several test processes; passive waiting costs little otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same random state, so a randomised test gives the same
    numbers alone, in any order, or in another worker (pytest -n)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def ref_weights(reference_dir: Path) -> dict[str, np.ndarray]:
    """The reference tiny-MOAT-0 weights under their official names."""
    return dict(np.load(reference_dir / "tiny_moat0_weights.npz"))


@pytest.fixture(scope="session")
def ref_prefix(reference_dir: Path) -> Path:
    """The same weights as a real TensorFlow (TF1-style) checkpoint prefix."""
    return reference_dir / "tf1_checkpoint" / "tiny_moat0"


@pytest.fixture(scope="module")
def shapes3(tmp_path_factory) -> Path:
    """3 classes x 4 training images, 1 validation image each, 32x32: the smallest set a
    training run, its checkpoints and its error paths can be tested on."""
    from moat.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes3")
    write_shapes_dataset(root, num_classes=3, train_per_class=4, val_per_class=1, img_size=32)
    return root
