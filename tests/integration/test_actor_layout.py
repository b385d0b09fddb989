"""The embedding actor pool's layout on a local Ray (2 CPUs, no GPU)."""

from __future__ import annotations

import pytest

from dermray.config import ExtractConfig
from dermray.errors import DermrayError
from dermray.stages.extract import actor_layout


def test_cpu_pool_is_one_actor_per_node(ray_local, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    layout = actor_layout(ExtractConfig(max_actors=3))
    assert layout["num_gpus"] == 0
    assert (layout["min_size"], layout["initial_size"], layout["max_size"]) == (1, 1, 3)
    assert layout["writer"] == "actors"
    fixed = actor_layout(ExtractConfig(num_actors=2))
    assert fixed["min_size"] == fixed["initial_size"] == fixed["max_size"] == 2


def test_gpu_actors_without_gpus_or_autoscaler_fail_fast(ray_local, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(DermrayError, match="extract.num_gpus_per_actor is 1 .* no GPU"):
        actor_layout(ExtractConfig(num_gpus_per_actor=1, max_actors=4))
    # in a joined cluster the autoscaler may bring GPUs: the pool asks for them all at once
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    layout = actor_layout(ExtractConfig(num_gpus_per_actor=1, max_actors=4))
    assert (layout["min_size"], layout["initial_size"], layout["max_size"]) == (1, 4, 4)
