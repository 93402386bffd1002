"""One fixture for the shared-memory part tests: each file's `Parts` wires the units it
tests over a small store; the fixture makes as many as a test asks for and closes them."""

from __future__ import annotations

import pytest


def made_fixture(parts_class):
    @pytest.fixture
    def made():
        out = []

        def make(**kw):
            out.append(parts_class(**kw))
            return out[-1]

        yield make
        for parts in out:
            parts.close()

    return made
