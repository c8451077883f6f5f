"""A Prefect API for tests: one ``prefect_test_harness`` (temporary server + SQLite) for the session.

tests/conftest.py makes it one fixture for the whole session: request it; do not import it.
The environment it needs (offline, no analytics, startup timeout) is set by conftest.py, before Prefect
reads its settings.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
