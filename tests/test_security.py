"""Security checks of reliability.md §3 (S1, S2, S4, S5, S6, S8) as §4.2 tests 16-19.

- 18, lint (S1, S4, S5): an AST scan (``unsafe_code``) of every package folder of the project
  finds no pickle-family module, ``recv_pyobj``, bare ``torch.load``, ``trust_remote_code=True``,
  ``eval``/``exec`` or unsafe ``yaml.load``; the scanner itself flags a synthetic bad file. The
  weight loader refuses pickle-capable checkpoints, and nothing in a model folder is imported
  (``auto_map`` code beside the config or the tokenizer never runs).
- 17, exposure (S2): a real ``k2serve serve --demo`` (Ray, controller, prefill and decode groups
  of EP=2, the router); every listening socket of its whole process tree, Ray's own included, is
  on the configured interface (127.0.0.1), none on 0.0.0.0 or ``::``.
- 16, auth coverage (S6), gRPC side (the REST side is test_bad_input's route enumeration): every
  method of every service the router's gRPC server exposes, listed by its own reflection, answers
  UNAUTHENTICATED without a valid key (missing, wrong, wrong case, ``Basic``, no scheme), except
  health and reflection; with the key no call is UNAUTHENTICATED. The same for the cluster's internal
  services (every rank's ``Worker`` and the controller's ``Registry``) and the cluster token: missing,
  wrong, a prefix of it, or sent as a bearer key is UNAUTHENTICATED; the stack itself, whose router
  and ranks call each other with it, serves a request.
- 19, prefix-cache isolation (S8): through a live router with keys for tenants A and B, the same
  long prompt from A, A, B: A's second request reports cached prompt tokens, B's none, even when B
  sends A's salt as ``cache_salt`` or in tenant-looking headers; on OpenAI, Anthropic and gRPC.
The serve process is started once for this module (about 15-60 s on two cores).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from router_fixtures import LiveRouter, live_router
from serve_process import ServeProcess
from unsafe_code import scan, scan_files

from k2serve.proto import cluster_pb2, cluster_token, serving_pb2, serving_pb2_grpc, worker_pb2
from k2serve.router.api_keys import ApiKeys
from k2serve.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
KEY_A, KEY_B = "k-tenant-a", "k-tenant-b"
CONFIGURED_HOST = "127.0.0.1"  # the demo's router.host and network.interface_host
PUBLIC_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
CALL_TIMEOUT_S = 30.0
CLUSTER_TOKEN = secrets.token_urlsafe(32)


# -- 18: the lint ------------------------------------------------------------------------------------


def project_files() -> list[Path]:
    """Every Python file of the project's packages (pyproject's package-dir), generated protobuf aside."""
    folders = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    files = {f for folder in folders.values() for f in (REPO / folder).glob("*.py")}
    return sorted(f for f in files if not re.search(r"_pb2(_grpc)?\.py$", f.name))


BAD_SNIPPET = """\
import pickle
from ray import cloudpickle
import ray
import torch as t, yaml, numpy as np
from torch import load
from transformers import AutoTokenizer
data = ray.cloudpickle.loads(b"")
msg = socket.recv_pyobj()
t.load("x.pt")
load("x.pt", weights_only=False)
AutoTokenizer.from_pretrained("m", trust_remote_code=True)
eval(request_text)
exec(code)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
np.load("x.npy", allow_pickle=True)
importlib.import_module("dill")
"""
BAD_HITS = [
    (1, "pickle-module"),
    (2, "pickle-module"),
    (7, "pickle-module"),
    (8, "pyobj-socket"),
    (9, "torch-load"),
    (10, "torch-load"),
    (11, "remote-code"),
    (12, "eval-exec"),
    (13, "eval-exec"),
    (14, "yaml-load"),
    (15, "yaml-load"),
    (16, "yaml-load"),
    (17, "torch-load"),
    (18, "pickle-module"),
]
SAFE_SNIPPET = """\
import torch, yaml, re
from yaml import SafeLoader
torch.load("x.pt", weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=SafeLoader)
yaml.load(text, yaml.CSafeLoader)
model.eval()
pattern = re.compile("x")
AutoTokenizer.from_pretrained("m", trust_remote_code=False)
AutoConfig.from_pretrained("m", trust_remote_code=config.trust_remote_code)
"""


def test_the_scanner_flags_every_unsafe_pattern_and_names_its_line() -> None:
    hits = scan(BAD_SNIPPET, "bad.py")
    assert [(h.line, h.rule) for h in hits] == BAD_HITS, "\n".join(map(str, hits))
    assert str(hits[0]) == "bad.py:1: [pickle-module] imports pickle"
    assert scan(SAFE_SNIPPET, "safe.py") == []


def test_no_pickle_eval_or_remote_code_anywhere_in_the_project() -> None:
    files = project_files()
    names = {str(f.relative_to(REPO)) for f in files}
    # the scan is not vacuous: the network paths are in it (router, worker service, KV transfer, registry)
    for expected in ("router/http_app.py", "workers/service.py", "workers/kv_transport_grpc.py", "cluster/registry.py"):
        assert expected in names
    assert len(files) > 150 and not any(n.endswith("_pb2.py") for n in names)
    hits = scan_files(REPO, files)
    assert hits == [], "unsafe deserialization or code execution:\n" + "\n".join(map(str, hits))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("security") / "tiny", seed=5)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_the_weight_loader_refuses_pickle_checkpoints(tmp_path: Path, model_dir: Path, name: str) -> None:
    from k2serve.workers.checkpoint_reader import CheckpointError
    from k2serve.workers.model_loader import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    for item in model_dir.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / name).write_bytes(b"\x80\x04\x95")  # a pickle header: refused unread
    with pytest.raises(CheckpointError, match="safetensors only") as refused:
        load_model(folder)
    assert refused.value.path is not None and refused.value.path.name == name


def test_code_in_a_model_folder_is_never_imported(tmp_path: Path, model_dir: Path) -> None:  # S5
    from k2serve.router.chat_template import ChatTemplate
    from k2serve.router.tokenizer import KimiTokenizer
    from k2serve.workers.config import ModelConfig
    from k2serve.workers.model_loader import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = (model_dir / "config.json").read_text()
    auto_map = '"auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModelForCausalLM": "modeling_deepseek.M"}, '
    (folder / "config.json").write_text(config.replace("{", "{" + auto_map, 1))
    marker = tmp_path / "remote-code-ran"
    modules = ("configuration_deepseek", "modeling_deepseek", "tokenization_kimi")
    for module in modules:  # tokenizer_config.json's auto_map names tokenization_kimi.TikTokenTokenizer
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('{module}')\n")
    assert "tokenization_kimi" in (folder / "tokenizer_config.json").read_text()

    ModelConfig.from_model_dir(folder)
    KimiTokenizer.from_model_dir(folder)
    ChatTemplate.from_model_dir(folder)
    load_model(folder)
    assert not marker.exists(), marker.read_text()
    assert not set(modules) & set(sys.modules)


# -- the running stack (17, 16) -------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    serving: ServeProcess
    grpc_target: str
    workers: dict[str, str]  # worker id -> address, from the ready line
    registry: str  # host:port, from the registry line


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "K2SERVE_API_KEYS": f"{KEY_A},{KEY_B}", cluster_token.ENV_VAR: CLUSTER_TOKEN}
    serving = ServeProcess.start(["serve", "--demo", "--demo-dir", str(folder / "demo")], folder, env=env)
    try:
        ready = next(line for line in serving.output if "ready at" in line)
        grpc_target = re.search(r"gRPC (\S+?),", ready)
        workers = dict(re.findall(r"([\w-]+)=([\d.]+:\d+)", ready.partition("workers:")[2]))
        assert grpc_target and workers, ready
        registry = next(
            re.findall(r"registry at (\S+) \(cluster token: (\S+)\)", line)
            for line in serving.output
            if "registry at" in line
        )
        assert registry == [(registry[0][0], cluster_token.ENV_VAR)], registry
        yield Stack(serving, grpc_target.group(1), workers, registry[0][0])
    finally:
        serving.stop()


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str
    kind: str  # tcp | udp
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.process} (pid {self.pid}) {self.kind} {self.ip}:{self.port}"


def listeners(root_pid: int) -> list[Listener]:
    """Listening TCP and bound UDP sockets of ``root_pid`` and all its descendants."""
    root = psutil.Process(root_pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name, connections = proc.name(), proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in connections:
            tcp = c.status == psutil.CONN_LISTEN
            udp = c.status == psutil.CONN_NONE and c.laddr and not c.raddr
            if tcp or udp:
                out.append(Listener(proc.pid, name, "tcp" if tcp else "udp", c.laddr.ip, c.laddr.port))
    return out


def on_interface(ip: str, host: str) -> bool:
    """``ip`` is ``host`` (an IPv4-mapped IPv6 address counts as its IPv4 address; any loopback
    address counts as loopback)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    wanted = ipaddress.ip_address(host)
    return address == wanted or (address.is_loopback and wanted.is_loopback)


def test_the_listener_scan_finds_a_wildcard_socket_in_a_child_process() -> None:
    """The scan below can fail: a grandchild of this process listening on 0.0.0.0 is reported."""
    code = "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)"
    shell = subprocess.Popen(["/bin/sh", "-c", f'"{sys.executable}" -c "{code}"'], stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout is not None
        port = int(shell.stdout.readline())
        found = [e for e in listeners(os.getpid()) if e.port == port]
        assert len(found) == 1 and ipaddress.ip_address(found[0].ip).is_unspecified, found
        assert not on_interface(found[0].ip, CONFIGURED_HOST)
        assert on_interface("::ffff:127.0.0.1", CONFIGURED_HOST) and on_interface("127.0.0.1", CONFIGURED_HOST)
    finally:
        for child in psutil.Process(shell.pid).children(recursive=True):
            child.kill()
        shell.kill()
        shell.wait(timeout=10)


def test_no_port_of_the_running_stack_listens_beyond_the_configured_interface(stack: Stack) -> None:  # S2
    found = listeners(stack.serving.proc.pid)
    ports = {entry.port for entry in found}
    # not vacuous: Ray's own servers, every rank and both router listeners are in the tree
    names = {entry.process for entry in found}
    assert {"gcs_server", "raylet"} <= names, sorted(names)
    ranks = {e.pid for e in found if e.process.startswith("ray::WorkerActor")}
    assert len(ranks) >= 4, sorted(names)  # the demo: a prefill and a decode group of two ranks each
    router_port = int(stack.serving.url.rsplit(":", 1)[1])
    grpc_port = int(stack.grpc_target.rsplit(":", 1)[1])
    worker_ports = {int(address.rsplit(":", 1)[1]) for address in stack.workers.values()}
    assert {router_port, grpc_port, *worker_ports} <= ports, (router_port, grpc_port, worker_ports, sorted(ports))
    wildcard = [str(e) for e in found if ipaddress.ip_address(e.ip.split("%")[0]).is_unspecified]
    assert wildcard == [], "listening on every interface:\n" + "\n".join(wildcard)
    elsewhere = [str(e) for e in found if not on_interface(e.ip, CONFIGURED_HOST)]
    assert elsewhere == [], f"listening beyond {CONFIGURED_HOST}:\n" + "\n".join(elsewhere)


BAD_CREDENTIALS = {
    "missing": (),
    "wrong-bearer": (("authorization", "Bearer wrong-key"),),
    "wrong-case-bearer": (("authorization", f"Bearer {KEY_A.upper()}"),),
    "wrong-case-x-api-key": (("x-api-key", KEY_A.upper()),),
    "basic-scheme": (("authorization", f"Basic {KEY_A}"),),
    "no-scheme": (("authorization", KEY_A),),
    "suffix": (("authorization", f"Bearer {KEY_A}x"),),
}


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def served_methods(channel: grpc.Channel) -> list[Method]:
    """Every method of every service the server lists through its own reflection (no key sent)."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    methods = []
    for service_name in database.get_services():
        service = pool.FindServiceByName(service_name)
        for m in service.methods:
            methods.append(Method(service.full_name, m.name, m.client_streaming, m.server_streaming))
    return methods


def call_status(channel: grpc.Channel, method: Method, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """The status of one call with an empty request message (streams: the first message or the end)."""
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    stub: Any = kind(method.path)  # no serializers: the request and the answers are raw bytes
    request: Any = iter([b""]) if method.client_streaming else b""
    try:
        answer = stub(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            next(iter(answer), None)
            answer.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_every_grpc_method_needs_a_key_except_health_and_reflection(stack: Stack) -> None:  # S6
    with grpc.insecure_channel(stack.grpc_target) as channel:
        methods = served_methods(channel)
        services = {m.service for m in methods}
        ours = {s.full_name for s in serving_pb2.DESCRIPTOR.services_by_name.values()}
        assert ours <= services and set(PUBLIC_GRPC_SERVICES) <= services, sorted(services)
        guarded = [m for m in methods if m.service not in PUBLIC_GRPC_SERVICES]
        assert {m.name for m in guarded} >= {"Generate", "Chat", "Abort", "ListModels", "Tokenize"}
        for method in guarded:
            for label, metadata in BAD_CREDENTIALS.items():
                status = call_status(channel, method, metadata)
                assert status == grpc.StatusCode.UNAUTHENTICATED, (method.path, label, status)
            for key in (KEY_A, KEY_B):
                for metadata in ((("authorization", f"bearer {key}"),), (("x-api-key", key),)):
                    status = call_status(channel, method, metadata)
                    assert status != grpc.StatusCode.UNAUTHENTICATED, (method.path, metadata, status)
        public = [m for m in methods if m.service in PUBLIC_GRPC_SERVICES]
        for method in public:  # Health/List is UNIMPLEMENTED by grpcio-health's servicer: fine, not a 401
            assert call_status(channel, method, ()) != grpc.StatusCode.UNAUTHENTICATED, method.path
        check = next(m for m in public if m.name == "Check")
        assert call_status(channel, check, ()) == grpc.StatusCode.OK


def descriptor_methods(service: Any) -> list[Method]:
    return [Method(service.full_name, m.name, m.client_streaming, m.server_streaming) for m in service.methods]


def test_every_internal_grpc_method_needs_the_cluster_token(stack: Stack) -> None:  # S6, internal services
    worker_service = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    registry_service = cluster_pb2.DESCRIPTOR.services_by_name["Registry"]
    assert len(stack.workers) >= 4, stack.workers  # the demo: two groups of EP=2
    bad = {
        "missing": (),
        "wrong": ((cluster_token.METADATA_KEY, secrets.token_urlsafe(32)),),
        "prefix": ((cluster_token.METADATA_KEY, CLUSTER_TOKEN[:-1]),),
        "as-bearer-key": (("authorization", f"Bearer {CLUSTER_TOKEN}"),),
    }
    good = ((cluster_token.METADATA_KEY, CLUSTER_TOKEN),)
    targets = [(stack.registry, registry_service), *((address, worker_service) for address in stack.workers.values())]
    for target, service in targets:
        with grpc.insecure_channel(target) as channel:
            methods = descriptor_methods(service)
            if service is worker_service:  # the descriptor lists what the rank serves (its own reflection)
                served = {m.path for m in served_methods(channel) if m.service == service.full_name}
                assert served == {m.path for m in methods}, (target, served)
            for method in methods:
                for label, metadata in bad.items():
                    status = call_status(channel, method, metadata)
                    assert status == grpc.StatusCode.UNAUTHENTICATED, (target, method.path, label, status)
                status = call_status(channel, method, good)
                assert status != grpc.StatusCode.UNAUTHENTICATED, (target, method.path, status)
            check = Method("grpc.health.v1.Health", "Check", False, False)
            assert call_status(channel, check, ()) == grpc.StatusCode.OK, target
    # the router and the ranks reach each other with it: a request still runs end to end
    answer = httpx.post(
        f"{stack.serving.url}/v1/completions",
        json={"prompt": "hello", "max_tokens": 2},
        headers={"authorization": f"Bearer {KEY_A}"},
        timeout=60.0,
    )
    assert answer.status_code == 200, answer.text


# -- 19: prefix-cache isolation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenants(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir, api_keys=(KEY_A, KEY_B)) as router:
        yield router


def forged(tenant_of: str) -> dict[str, str]:
    """Headers a client might hope the server reads its tenant or salt from: set to ``tenant_of``'s."""
    salt = ApiKeys((tenant_of,)).tenant(tenant_of) or ""
    return {"x-tenant-id": salt, "x-k2serve-tenant": salt, "x-cache-salt": salt, "openai-organization": salt}


def long_prompt_ids(seed: int, num_tokens: int = 80) -> list[int]:
    """``num_tokens`` ids (more than 64) unique to this test: no earlier request cached them."""
    rng = secrets.SystemRandom(seed)
    return [rng.randrange(1, 400) for _ in range(num_tokens)]


def test_tenants_never_share_cached_prefixes_on_openai(tenants: LiveRouter) -> None:  # S8
    prompt = long_prompt_ids(1)

    def cached(key: str, headers: dict[str, str] | None = None, **extra: Any) -> int:
        body = {"model": tenants.model_name, "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
        headers = {"authorization": f"Bearer {key}", **(headers or {})}
        response = httpx.post(f"{tenants.http_url}/v1/completions", json=body, headers=headers, timeout=CALL_TIMEOUT_S)
        assert response.status_code == 200, response.text[:300]
        assert response.json()["usage"]["prompt_tokens"] == len(prompt)
        return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached(KEY_A) == 0
    assert cached(KEY_A) >= 64  # A's second request reuses A's blocks
    a_salt = ApiKeys((KEY_A,)).tenant(KEY_A)
    assert cached(KEY_B, forged(KEY_A), cache_salt=a_salt) == 0  # B cannot claim A's salt
    assert cached(KEY_B) >= 64  # B's first request was cached, under B's own salt
    assert cached(KEY_A, cache_salt="some-other-salt") >= 64  # a client salt partitions nothing


def test_tenants_never_share_cached_prefixes_on_anthropic(tenants: LiveRouter) -> None:  # S8
    text = " ".join(f"w{i}" for i in range(40))  # > 64 tokens with the template

    def cached(key: str, headers: dict[str, str] | None = None) -> int:
        body = {
            "model": tenants.model_name,
            "max_tokens": 1,
            "temperature": 0,
            "messages": [{"role": "user", "content": text}],
        }
        response = httpx.post(
            f"{tenants.http_url}/v1/messages",
            json=body,
            headers={"x-api-key": key, **(headers or {})},
            timeout=CALL_TIMEOUT_S,
        )
        assert response.status_code == 200, response.text[:300]
        usage = response.json()["usage"]
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] >= 64
        return int(usage["cache_read_input_tokens"])

    assert cached(KEY_A) == 0
    assert cached(KEY_A) >= 64
    assert cached(KEY_B, forged(KEY_A)) == 0


def test_tenants_never_share_cached_prefixes_on_grpc(tenants: LiveRouter) -> None:  # S8
    prompt = long_prompt_ids(2)
    request = serving_pb2.GenerateRequest(
        token_ids=serving_pb2.TokenIds(ids=prompt),
        sampling=serving_pb2.SamplingParams(max_tokens=1, temperature=0.0),
    )

    def cached(key: str, extra: tuple[tuple[str, str], ...] = ()) -> int:
        with grpc.insecure_channel(tenants.grpc_target) as channel:
            stub = serving_pb2_grpc.ServingStub(channel)
            metadata = (("authorization", f"Bearer {key}"), *extra)
            messages = list(stub.Generate(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
        usage = messages[-1].usage
        assert usage.prompt_tokens == len(prompt)
        return int(usage.cached_tokens)

    assert cached(KEY_A) == 0
    assert cached(KEY_A) >= 64
    assert cached(KEY_B, tuple(forged(KEY_A).items())) == 0
