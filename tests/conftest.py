"""Shared test configuration: per-test user data folder, and GUI tests skipped where no display exists."""
from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def _user_data_home(tmp_path_factory, monkeypatch):
    """Files written to the per-user data folder (autosaved landmarks) go to a temporary folder."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg_data")))


def _has_display() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or os.environ.get("QT_QPA_PLATFORM"))


def pytest_collection_modifyitems(config, items):
    if _has_display():
        return
    skip = pytest.mark.skip(reason="GUI test: no display; run under xvfb-run (see README, Testing)")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)
