"""The actor pools' layout: extract's embedders and predict's predictors share one rule
(``raysession.pool_layout``); on a local Ray (2 CPUs, no GPU) and on clusters described by hand."""

from __future__ import annotations

import pytest

from dermray.config import ExtractConfig
from dermray.errors import DermrayError
from dermray.stages import predict
from dermray.stages.extract import actor_layout
from dermray.stages.raysession import pool_layout


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


def test_one_pool_rule_for_both_stages(ray_local, monkeypatch):
    # 4 GPUs on 2 nodes: an actor per GPU, all asked for at once; TensorFlow picks its threads
    assert pool_layout(4, 2, 8) == {"min_size": 4, "max_size": 4, "initial_size": 4,
                                    "num_gpus": 1.0, "threads": 0}
    assert pool_layout(4, 2, 8, max_actors=6)["max_size"] == 6
    assert pool_layout(4, 2, 8, num_gpus_per_actor=2)["min_size"] == 2
    # no GPU: one actor per node with all of its cores; num_actors fixes the size
    assert pool_layout(0, 3, 8) == {"min_size": 3, "max_size": 3, "initial_size": 3,
                                    "num_gpus": 0.0, "threads": 8}
    assert pool_layout(0, 3, 8, num_actors=5)["max_size"] == 5
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    embedders = actor_layout(ExtractConfig())
    predictors = predict.actor_layout()
    shared = ("min_size", "max_size", "initial_size", "num_gpus", "threads")
    assert {k: predictors[k] for k in shared} == {k: embedders[k] for k in shared}
    assert predictors["num_cpus"] == 1 and predict.actor_layout(2)["max_size"] == 2


def test_requests_the_local_ray_can_never_hold_are_refused(ray_local, monkeypatch):
    """Against the real local Ray (2 CPUs, no GPU): a trial, an embedding actor or a predictor
    asking for more than its node has is refused naming the setting and the node's resources;
    what fits passes (issue 22: `cpus_per_trial: 64` and `cpus_per_actor: 64` hung forever)."""
    from dermray.config import SearchConfig
    from dermray.stages.extract import actor_requests
    from dermray.stages.raysession import check_resources
    from dermray.stages.search import check_trial_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(DermrayError, match=r"search.cpus_per_trial: 64\) asks for CPU 64 per "
                       r"task, but this local Ray has node [0-9.]+: CPU 2, GPU 0"):
        check_trial_resources(SearchConfig(families=("logistic",), cpus_per_trial=64))
    check_trial_resources(SearchConfig(families=("logistic", "xgboost"), cpus_per_trial=2))
    cfg = ExtractConfig(cpus_per_actor=64)
    with pytest.raises(DermrayError, match="extract.cpus_per_actor: 64.* CPU 2, GPU 0"):
        check_resources(actor_requests(cfg, actor_layout(cfg)))
    cfg = ExtractConfig(cpus_per_actor=2)
    check_resources(actor_requests(cfg, actor_layout(cfg)))
    with pytest.raises(DermrayError, match="finetune.*GPU 0.5 per task"):
        check_trial_resources(SearchConfig(families=("finetune",), features=("resnet50",),
                                           family_settings={"gpus_per_finetune_trial": 0.5}))
