"""The ``weston`` fixture: a headless weston per test, or a skip that says what is missing
(a failure under CI, where `make test` installs weston and the wayland extra)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

from tests.wayland.weston import SCREENSHOOTER, WESTON, Weston, running_weston


def _missing() -> str | None:
    if importlib.util.find_spec("pywayland") is None:
        return 'pywayland is not installed (pip install -e ".[wayland]"; make test does)'
    if WESTON is None or SCREENSHOOTER is None:
        return "weston is not installed (apt-get install weston; make test does)"
    return None


@pytest.fixture
def weston() -> Iterator[Weston]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the compositor tests cannot run under CI: {missing}")
        pytest.skip(missing)
    with running_weston() as running:
        yield running
