import os

import pytest


@pytest.fixture
def clean_flashprefill_env(monkeypatch):
    """Remove every ``FLASHPREFILL_*`` variable, so a developer's shell cannot change a result."""
    for name in list(os.environ):
        if name.startswith("FLASHPREFILL_"):
            monkeypatch.delenv(name)
    return monkeypatch
