"""Config for the lifecycle: replicas and their GPUs, groups and max_loaded, and the outlier arithmetic."""

from __future__ import annotations

import pytest

from engines.replica.outlier import Outlier
from engines.scheduling.placement import Placement, check_placement, must_stop_for, plan_for
from engines.spec import ModelSpec, OutlierPolicy
from gateway.config.loader import ConfigError, build_config


def spec(name: str, **kw: object) -> ModelSpec:
    return ModelSpec(name=name, engine="vllm", model="/m", **kw)  # type: ignore[arg-type]


def test_gpus_one_list_per_replica_or_split_evenly() -> None:
    nested = spec("a", gpus=[[0, 1], [2, 3]])
    assert (nested.replicas, nested.gpus, nested.replica_gpus, nested.tp_size) == (2, (0, 1, 2, 3), ((0, 1), (2, 3)), 2)
    flat = spec("a", gpus=[0, 1, 2, 3], replicas=2, port=9000, env={"LOG": "/var/log/a-{replica}.log", "X": "y"})
    assert flat.replica_gpus == ((0, 1), (2, 3)) and flat == spec(
        "a", gpus=[[0, 1], [2, 3]], port=9000, env={"LOG": "/var/log/a-{replica}.log", "X": "y"}
    )
    second = flat.for_replica(1)
    assert (second.gpus, second.port, second.tp_size) == ((2, 3), 9001, 2)
    assert second.env == {"LOG": "/var/log/a-1.log", "X": "y"}
    single = spec("b", gpus=[0])
    assert single.for_replica(0) is single and single.replica_gpus == ((0,),)
    assert spec("c", replicas=3).replica_gpus == ((), (), ())


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"gpus": [0, 1, 2], "replicas": 2}, "split evenly"),
        ({"gpus": [[0], [0]]}, "listed twice"),
        ({"gpus": [[0], [1]], "replicas": 3}, "has 2 lists"),
    ],
)
def test_impossible_replica_gpus_are_refused(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        spec("a", **kw)
    with pytest.raises(ValueError, match="'replicas' must be 1"):
        ModelSpec(name="r", engine="openai", url="http://x/v1", replicas=2)


def test_who_must_stop_for_whom() -> None:
    p = Placement.model_validate(
        {"groups": {"g": {"members": ["chat", "embed"]}, "solo": {"members": ["big"], "exclusive": True}}}
    )
    chat, embed = plan_for(spec("chat", gpus=[0]), p), plan_for(spec("embed", gpus=[0]), p)
    other, big = plan_for(spec("other", gpus=[0, 1]), p), plan_for(spec("big", gpus=[7]), p)
    far = plan_for(spec("far", gpus=[5]), p)
    remote = plan_for(ModelSpec(name="remote", engine="openai", url="http://x/v1"), p, spawns=False)
    assert not must_stop_for(chat, embed)  # one group: they share GPU 0
    assert must_stop_for(other, chat) and must_stop_for(chat, other)  # GPU 0, no group in common
    assert not must_stop_for(far, chat)
    assert must_stop_for(big, far) and not must_stop_for(far, big)  # exclusive clears others when it starts
    assert not must_stop_for(big, remote)  # a remote engine holds no GPU
    assert must_stop_for(chat, plan_for(spec("chat", gpus=[3]), p))  # two versions of one model never overlap


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            {
                "models": {
                    "a": {"engine": "vllm", "model": "/m", "gpus": [0]},
                    "b": {"engine": "vllm", "model": "/m", "gpus": [1, 0]},
                }
            },
            "'a' and 'b' share GPU 0",
        ),
        (
            {"groups": {"g": {"members": ["a", "zz"]}}, "models": {"a": {"engine": "vllm", "model": "/m"}}},
            "'zz' is not a configured model",
        ),
        (
            {
                "groups": {"g": {"members": ["a"]}, "h": {"members": ["a"]}},
                "models": {"a": {"engine": "vllm", "model": "/m"}},
            },
            "in two groups",
        ),
        (
            {
                "max_loaded": 1,
                "models": {"a": {"engine": "vllm", "model": "/m"}, "b": {"engine": "vllm", "model": "/m"}},
            },
            "2 eager models but max_loaded is 1",
        ),
    ],
)
def test_config_refuses_placements_that_cannot_be_honoured(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_config(raw)


def test_config_accepts_groups_on_demand_sharing_and_queue_keys() -> None:
    config = build_config(
        {
            "groups": {"small": {"members": ["chat", "embed"]}},
            "max_loaded": 2,
            "models": {
                "chat": {
                    "engine": "vllm",
                    "model": "/m",
                    "gpus": [0],
                    "max_queue": 8,
                    "queue_timeout": 5,
                    "max_concurrency": 4,
                    "outlier": {"consecutive_failures": 3},
                },
                "embed": {"engine": "vllm", "model": "/m", "gpus": [0]},
                "big": {"engine": "vllm", "model": "/m", "gpus": [0, 1], "load": "on_demand", "idle_timeout": 600},
            },
        }
    )
    assert config.placement.max_loaded == 2 and config.placement.group_of("embed") is not None
    chat = config.models[0]
    assert (chat.max_queue, chat.queue_timeout, chat.max_concurrency, chat.outlier.consecutive_failures) == (8, 5, 4, 3)
    assert (config.models[1].max_queue, config.models[1].queue_timeout) == (64, None)
    check_placement(config.models, config.placement)


def test_outlier_ejection_grows_caps_and_is_forgiven() -> None:
    policy = OutlierPolicy(consecutive_failures=2, base_ejection_time=10, max_ejection_time=25)
    out = Outlier()
    assert not out.failure(policy)
    out.success()
    assert not out.failure(policy) and out.failure(policy)
    assert out.eject(policy, 0) == 10 and out.ejected(9.9) and not out.ejected(10)
    assert out.eject(policy, 11) == 20 and out.eject(policy, 32) == 25  # base times the times ejected, capped
    assert out.eject(policy, 57 + 25) == 10  # in rotation for max_ejection_time since: starts over
