"""``ClusterConfig`` from YAML: the two pool shapes, defaults, every validation rule naming its dotted
field, checks against the model's config.json when it is readable, and the rank plan the controller
hands each worker actor. Fast: no Ray instance, no model load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.config_error import ClusterConfigError
from k2serve.cluster.rank_plan import build_rank_spec, rank_spec_dict, resolve_host, worker_options_dict
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.cache_budget import bytes_per_block
from k2serve.workers.config import ModelConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cfg") / "tiny")  # 8 routed experts


def _disaggregated(model: str | Path = "/nonexistent/model") -> dict[str, Any]:
    return {
        "model": str(model),
        "pools": {
            "prefill": {"groups": 1, "ep_size": 2, "kv_cache_blocks": 32},
            "decode": {"groups": 2, "ep_size": 4, "kv_cache_memory": "2GiB"},
        },
    }


def _error(data: Any) -> ClusterConfigError:
    with pytest.raises(ClusterConfigError) as info:
        ClusterConfig.from_dict(data)
    return info.value


# ---- shapes and defaults ---------------------------------------------------------------------------------


def test_disaggregated_config_reads_both_pools_with_defaults() -> None:
    config = ClusterConfig.from_dict(_disaggregated())
    assert config.shape == "disaggregated"
    assert [p.name for p in config.pools] == ["prefill", "decode"]
    prefill, decode = config.pool("prefill"), config.pool("decode")
    assert (prefill.role, decode.role) == ("prefill", "decode")
    assert (prefill.groups, prefill.ep_size, prefill.kv_cache_blocks, prefill.kv_cache_memory) == (1, 2, 32, None)
    assert (decode.kv_cache_blocks, decode.kv_cache_memory) == (None, 2 * 2**30)
    assert (prefill.device, prefill.dtype, prefill.rank_resources()) == ("cpu", "float32", {"CPU": 1.0})
    assert config.network.interface_host == "127.0.0.1"
    assert config.ray.address is None and config.ray.auth == "token" and not config.ray.detached
    assert config.kv_transfer.transport == "p2p"


def test_colocated_config_is_one_mixed_pool() -> None:
    config = ClusterConfig.from_dict({"model": "/m", "pools": {"colocated": {"ep_size": 2}}})
    assert config.shape == "colocated"
    (pool,) = config.pools
    assert (pool.name, pool.role, pool.groups, pool.kv_cache_blocks) == ("colocated", "mixed", 1, 256)


def test_gpu_pool_defaults_to_bfloat16_on_cuda_with_gpu_resources() -> None:
    data = {"model": "/m", "pools": {"colocated": {"gpus_per_rank": 1, "cpus_per_rank": 4}}}
    pool = ClusterConfig.from_dict(data).pools[0]
    assert (pool.device, pool.dtype) == ("cuda", "bfloat16")
    assert pool.rank_resources() == {"CPU": 4.0, "GPU": 1.0}


def test_yaml_file_and_to_dict_round_trip(tmp_path: Path) -> None:
    data = _disaggregated()
    data |= {
        "router": {"host": "127.0.0.1", "port": 8001, "grpc_port": 50052, "policy": "least_loaded"},
        "ray": {"address": "10.0.0.1:6379", "namespace": "prod", "detached": True},
        "network": {"interface_host": "node"},
        "kv_transfer": {"transport": "grpc", "lease_ttl_s": 12, "timeout_s": 9, "lanes": 2},
        "health": {"interval_s": 1, "timeout_s": 0.5, "failures": 2, "start_timeout_s": 60},
        "restart": {"max_restarts": 2, "backoff_initial_s": 0.1, "backoff_max_s": 1, "reset_after_s": 30},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    config = ClusterConfig.from_yaml(path)
    assert config.router.policy == "least_loaded" and config.ray.namespace == "prod" and config.ray.detached
    assert config.kv_transfer.transport == "grpc" and config.kv_transfer.lease_ttl_s == 12.0
    assert (config.kv_transfer.timeout_s, config.kv_transfer.lanes) == (9.0, 2)
    assert config.health.failures == 2 and config.restart.backoff_max_s == 1.0
    assert ClusterConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_demo_is_one_prefill_and_one_decode_group_of_ep2(model_dir: Path) -> None:
    config = ClusterConfig.demo(model_dir)
    assert [(p.name, p.groups, p.ep_size) for p in config.pools] == [("prefill", 1, 2), ("decode", 1, 2)]
    assert sum(p.groups * p.ep_size * p.cpus_per_rank for p in config.pools) <= 2  # fits 2 cores
    colocated = ClusterConfig.demo(model_dir, colocated=True)
    assert [(p.name, p.groups, p.ep_size) for p in colocated.pools] == [("colocated", 1, 2)]


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ClusterConfigError):
        ClusterConfig.from_yaml(path)


# ---- validation names the field --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("model"), "model"),
        (lambda d: d.update(modle="/x"), "modle"),
        (lambda d: d["pools"]["decode"].update(ep_sise=2), "pools.decode.ep_sise"),
        (lambda d: d.update(router={"prot": 1}), "router.prot"),
        (lambda d: d["pools"]["decode"].update(groups=-1), "pools.decode.groups"),
        (lambda d: d["pools"]["decode"].update(groups="two"), "pools.decode.groups"),
        (lambda d: d["pools"]["decode"].update(groups=True), "pools.decode.groups"),
        (lambda d: d["pools"]["decode"].update(ep_size=0), "pools.decode.ep_size"),
        (lambda d: d["pools"]["prefill"].update(kv_cache_memory="1GiB"), "pools.prefill.kv_cache_memory"),
        (lambda d: d["pools"]["decode"].update(kv_cache_memory="lots"), "pools.decode.kv_cache_memory"),
        (lambda d: d["pools"]["decode"].update(kv_cache_memory=0), "pools.decode.kv_cache_memory"),
        (lambda d: d["pools"]["prefill"].update(kv_cache_blocks=0), "pools.prefill.kv_cache_blocks"),
        (lambda d: d["pools"]["prefill"].update(dtype="int8"), "pools.prefill.dtype"),
        (lambda d: d["pools"]["prefill"].update(cpus_per_rank=0), "pools.prefill.cpus_per_rank"),
        (lambda d: d["pools"]["prefill"].update(gpus_per_rank=1.5), "pools.prefill.gpus_per_rank"),
        (lambda d: d["pools"]["prefill"].update(redundant_experts=3), "pools.prefill.redundant_experts"),
        (lambda d: d["pools"]["prefill"].update(ep_size=1, redundant_experts=2), "pools.prefill.redundant_experts"),
        (lambda d: d["pools"].pop("decode"), "pools.decode"),
        (lambda d: d["pools"].update(colocated={}), "pools"),
        (lambda d: d["pools"].update(mixed={}), "pools.mixed"),
        (lambda d: d.update(pools={}), "pools"),
        (lambda d: d.update(ray={"address": "h:6379", "num_cpus": 4}), "ray.num_cpus"),
        (lambda d: d.update(ray={"auth": "password"}), "ray.auth"),
        (lambda d: d.update(router={"port": 70000}), "router.port"),
        (lambda d: d.update(router={"policy": "Round Robin"}), "router.policy"),
        (lambda d: d.update(kv_transfer={"transport": "nixl"}), "kv_transfer.transport"),
        (lambda d: d.update(kv_transfer={"lease_ttl_s": 0}), "kv_transfer.lease_ttl_s"),
        (lambda d: d.update(kv_transfer={"handoff_wait_s": -1}), "kv_transfer.handoff_wait_s"),
        (lambda d: d.update(kv_transfer={"checksum": "yes"}), "kv_transfer.checksum"),
        (lambda d: d.update(kv_transfer={"lanes": 0}), "kv_transfer.lanes"),
        (lambda d: d.update(kv_transfer={"lanes": 17}), "kv_transfer.lanes"),
        (lambda d: d.update(kv_transfer={"timeout_s": 0}), "kv_transfer.timeout_s"),
        (lambda d: d.update(router={"migration_limit": -1}), "router.migration_limit"),
        (lambda d: d.update(router={"stall_timeout_s": "x"}), "router.stall_timeout_s"),
        (lambda d: d.update(health={"failures": 0}), "health.failures"),
        (lambda d: d.update(health={"timeout_s": float("nan")}), "health.timeout_s"),
        (lambda d: d.update(restart={"backoff_initial_s": 5, "backoff_max_s": 1}), "restart.backoff_max_s"),
        (lambda d: d.update(network={"interface_host": ""}), "network.interface_host"),
        (lambda d: d.update(network=["127.0.0.1"]), "network"),
    ],
)
def test_each_invalid_value_names_its_dotted_field(edit: Any, field: str) -> None:
    data = copy.deepcopy(_disaggregated())
    edit(data)
    error = _error(data)
    assert error.field == field, str(error)
    assert field in str(error)


def test_ep_size_must_divide_the_models_experts_when_the_model_is_readable(model_dir: Path) -> None:
    data = _disaggregated(model_dir)
    data["pools"]["decode"] |= {"ep_size": 3, "kv_cache_memory": None, "kv_cache_blocks": 8}
    error = _error(data)
    assert error.field == "pools.decode.ep_size" and "8 routed experts" in error.message
    data["pools"]["decode"]["ep_size"] = 4
    assert ClusterConfig.from_dict(data).pool("decode").ep_size == 4


def test_without_the_model_folder_the_expert_count_is_not_checked() -> None:
    data = _disaggregated()
    data["pools"]["decode"]["ep_size"] = 3  # plausible on the head node, which may not hold the model
    assert ClusterConfig.from_dict(data).pool("decode").ep_size == 3


def test_redundant_experts_cannot_exceed_the_models_experts(model_dir: Path) -> None:
    data = _disaggregated(model_dir)
    data["pools"]["prefill"]["redundant_experts"] = 10
    assert _error(data).field == "pools.prefill.redundant_experts"
    data["pools"]["prefill"]["redundant_experts"] = 4
    assert ClusterConfig.from_dict(data).pool("prefill").redundant_experts == 4


def test_kv_cache_memory_must_hold_one_block_of_the_model(model_dir: Path) -> None:
    data = _disaggregated(model_dir)
    data["pools"]["decode"]["kv_cache_memory"] = 1000
    error = _error(data)
    assert error.field == "pools.decode.kv_cache_memory" and "one KV block" in error.message


# ---- the rank plan ---------------------------------------------------------------------------------------


def test_rank_plan_builds_the_rank_spec_and_resolves_a_memory_budget(model_dir: Path) -> None:
    config = ClusterConfig.from_dict(_disaggregated(model_dir))
    decode = config.pool("decode")
    spec = build_rank_spec(rank_spec_dict(config, decode, 3, "127.0.0.1:1234"))
    block_bytes = bytes_per_block(ModelConfig.from_model_dir(model_dir), decode.block_size, 4)
    assert (spec.ep_size, spec.ep_rank, spec.rendezvous, spec.device) == (4, 3, "127.0.0.1:1234", "cpu")
    assert spec.num_blocks == 2 * 2**30 // block_bytes
    prefill_spec = build_rank_spec(rank_spec_dict(config, config.pool("prefill"), 0, "127.0.0.1:1"))
    assert prefill_spec.num_blocks == 32
    options = worker_options_dict(config, decode, "decode-g1-r3")
    assert options == {
        "worker_id": "decode-g1-r3",
        "role": "decode",
        "host": "127.0.0.1",
        "port": 0,
        "transport": "p2p",
        "lease_ttl_s": 30.0,
        "handoff_wait_s": 30.0,
        "checksum": False,
        "transfer_timeout_s": 30.0,
        "kv_lanes": 4,
        "model_name": model_dir.name,
        "metrics_port": 0,
        "cluster_token": None,
    }
    with_token = worker_options_dict(config, decode, "decode-g1-r3", "t" * 32)
    assert with_token == {**options, "cluster_token": "t" * 32}
    from k2serve.workers.worker_options import WorkerOptions

    assert "t" * 32 not in repr(WorkerOptions(**with_token))  # options are logged: never the secret


def test_kv_lanes_bound_matches_the_transport_and_worker_options_check_it() -> None:
    from k2serve.cluster.config import MAX_KV_LANES
    from k2serve.workers.kv_pair_group import MAX_LANES
    from k2serve.workers.service import WorkerOptions

    assert MAX_KV_LANES == MAX_LANES
    assert WorkerOptions("d0", "decode", kv_lanes=MAX_LANES).kv_lanes == MAX_LANES
    for bad in (0, MAX_LANES + 1):
        with pytest.raises(ValueError, match="kv_lanes"):
            WorkerOptions("d0", "decode", kv_lanes=bad)


def test_interface_host_node_means_the_ray_node_ip() -> None:
    assert resolve_host("node", "10.1.2.3") == "10.1.2.3"
    assert resolve_host("127.0.0.1", "10.1.2.3") == "127.0.0.1"
