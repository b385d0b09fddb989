"""A local Ray started once per session (num_cpus=2), with the actor fault hook armed once."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from dermray.extract import FAULT_ONCE_ENV

    # the first Embedder batch of the session kills its actor once: every extraction test then
    # also checks that Ray's restart + retry still gives exactly the planned rows
    marker = tmp_path_factory.mktemp("fault") / "killed"
    os.environ[FAULT_ONCE_ENV] = str(marker)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()
    os.environ.pop(FAULT_ONCE_ENV, None)
