"""The `lbgm_federation` pytest fixture, registered through the `pytest11` entry point so that any
project with lbgm installed has it without a conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest


@pytest.fixture
def lbgm_federation(tmp_path) -> Iterator[Callable[..., Any]]:
    """A factory: lbgm_federation(task, workers=4, rounds=3, **settings) runs a local federation
    (lbgm.testing.local_federation) with its run folder under tmp_path and returns its FederationResult."""
    from lbgm.testing import local_federation  # imported when used: loading the plugin stays cheap

    with ExitStack() as stack:
        def run(task: str, *args: Any, **kwargs: Any) -> Any:
            return stack.enter_context(local_federation(task, *args, **{"out_dir": tmp_path, **kwargs}))

        yield run
