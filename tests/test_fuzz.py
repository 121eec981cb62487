"""Fuzzing the router's two public surfaces (reliability.md §4.2 test 15), against a live router over a
real worker of the tiny model (real uvicorn and gRPC on loopback, API keys on).

- REST: schemathesis reads the OpenAPI document the router serves (``/openapi.json``, behind the
  key) and generates requests for every operation: positive cases (bodies that fit the documented
  schemas) and negative ones (bodies that break them). Every answer must be no 5xx
  (``not_a_server_error``), conform to the schema documented for its status and content type,
  and, when an error, be a bounded body with no traceback or file path (S11).
- gRPC: hypothesis builds every ``k2serve.v1.Serving`` request message from its descriptor
  (``proto_strategies``: arbitrary Unicode, integers up to the wire type's limits, NaN and
  infinite floats, empty and long repeated fields, unset and set optionals and oneofs) and calls
  the method with the key: the status is never INTERNAL, UNKNOWN or UNAVAILABLE (only OK,
  INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED), and INVALID_ARGUMENT names a field of the
  request (``sampling.top_p: ...``).
Generation is kept short by the server, not by the inputs: the router serves a context of
``MAX_MODEL_LEN`` tokens and at most ``MAX_N`` choices, so any ``max_tokens`` beyond the room is a
400 and every accepted request ends within the context. Afterwards the router still answers, and
no admission slot, running request, lease or pinned block is left behind. Fast runs use
``FAST_EXAMPLES`` per operation and mode; the ``slow`` ones ``SLOW_EXAMPLES``. What the fuzzers
found is pinned down by explicit cases at the end (they fail without the fixes).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import schemathesis
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from proto_strategies import message_strategy
from request_ledger import report
from router_fixtures import LiveRouter, live_router
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from k2serve.proto import serving_pb2, serving_pb2_grpc
from k2serve.router.admission import AdmissionLimits
from k2serve.router.sampling_check import RequestLimits
from k2serve.tiny_model import make_tiny_model

KEY = "k-fuzz"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 96  # every accepted generation ends within this context (the tiny model: ~50 output tokens)
MAX_N = 2
FAST_EXAMPLES = 25
SLOW_EXAMPLES = 200
CALL_TIMEOUT_S = 60.0
MAX_ERROR_BYTES = 4096
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/home/|site-packages|\bline \d+")
ALLOWED_GRPC = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRouter]:
    model_dir = make_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny", seed=13)
    with live_router(
        model_dir,
        api_keys=(KEY,),
        max_model_len=MAX_MODEL_LEN,
        limits=RequestLimits(max_n=MAX_N),
        admission=AdmissionLimits(max_running=MAX_N, max_waiting=MAX_N),  # 64 prompts at once: a quick 429
    ) as router:
        yield router


@dataclass
class Findings:
    """What a fuzz run saw: answers per operation and status, and every failed check."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return sum(self.statuses.values())

    def ok(self, operation: str) -> int:
        return sum(n for (op, status), n in self.statuses.items() if op == operation and status in ("200", "OK"))

    def by_status(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for (_, status), n in self.statuses.items():
            counts[status] += n
        return dict(sorted(counts.items()))

    def fail(self, text: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(text[:2000])


def fuzz(strategy: st.SearchStrategy[Any], examples: int, run: Callable[[Any], None]) -> None:
    """Run ``run`` on ``examples`` drawn cases; ``run`` records failures itself (no shrinking, so a
    failing case costs one call and every operation still gets its examples). Runs of the default
    size draw the same cases every time (a few dozen random cases can miss every valid request);
    the slow runs draw fresh ones."""

    @given(strategy)
    @settings(
        max_examples=examples,
        derandomize=examples < SLOW_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def each(case: Any) -> None:
        run(case)

    each()


def assert_quiescent(live: LiveRouter) -> None:
    """The router still serves, and nothing the fuzz run started is left holding resources."""
    body = {"prompt": "hello", "max_tokens": 2, "temperature": 0}
    response = httpx.post(f"{live.http_url}/v1/completions", json=body, headers=AUTH, timeout=CALL_TIMEOUT_S)
    assert response.status_code == 200, response.text[:300]
    deadline = time.monotonic() + 10.0  # a just-cancelled stream releases its slot within a few polls
    while True:
        loads = live.loads()
        busy = live.frontend.admission.running or any(
            load.running or load.waiting or load.leases or load.pinned_blocks for load in loads
        )
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert live.frontend.admission.running == 0
    for load in loads:
        assert (load.running, load.waiting, load.leases, load.pinned_blocks) == (0, 0, 0, 0), load


# -- REST: schemathesis ---------------------------------------------------------------------------


def rest_fuzz(live: LiveRouter, mode: GenerationMode, examples: int) -> Findings:
    schema = schemathesis.openapi.from_url(f"{live.http_url}/openapi.json", headers=AUTH, timeout=CALL_TIMEOUT_S)
    schema.config.generation.update(allow_x00=False)  # NUL anywhere is one 400 (test_bad_input), not news
    findings = Findings()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not len(operation.body) and not list(operation.iter_parameters()):
            continue  # nothing to break in a GET without parameters

        def run(case: Any, label: str = operation.label) -> None:
            try:
                response = case.call(base_url=live.http_url, headers=AUTH, timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # a dropped connection or a timeout is a finding too
                findings.fail(f"{label}: no answer ({type(exc).__name__}: {exc})\n{case.as_curl_command()}")
                return
            findings.statuses[(label, str(response.status_code))] += 1
            try:
                case.validate_response(
                    response, checks=[not_a_server_error, response_schema_conformance, content_type_conformance]
                )
            except Exception as exc:
                findings.fail(f"{label}: {exc}\n{case.as_curl_command()}")
            if response.status_code >= 400:
                text = response.text
                if len(response.content) > MAX_ERROR_BYTES or LEAKS.search(text):
                    findings.fail(f"{label}: error body of {len(response.content)} bytes: {text[:300]}")

        fuzz(operation.as_strategy(generation_mode=mode), examples, run)
    return findings


def check_rest(live: LiveRouter, mode: GenerationMode, examples: int) -> None:
    findings = rest_fuzz(live, mode, examples)
    summary = f"{findings.cases} {mode.value} REST fuzz cases, {len(findings.failures)} failed checks"
    report(
        f"test_fuzz rest {mode.value}",
        summary + f"; statuses {findings.by_status()}",
    )
    assert findings.failures == [], "\n\n".join(findings.failures)
    if mode == GenerationMode.POSITIVE:  # the fuzz reached generation, not only validation
        for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/messages"):
            assert findings.ok(label) > 0, (label, findings.statuses)
    assert_quiescent(live)


def test_rest_fuzz_positive_cases_get_no_5xx_and_conform_to_the_schema(live: LiveRouter) -> None:
    check_rest(live, GenerationMode.POSITIVE, FAST_EXAMPLES)


def test_rest_fuzz_negative_cases_get_a_4xx_body_never_a_5xx(live: LiveRouter) -> None:
    check_rest(live, GenerationMode.NEGATIVE, FAST_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_rest_fuzz_long_run(live: LiveRouter, mode: GenerationMode) -> None:
    check_rest(live, mode, SLOW_EXAMPLES)


# -- gRPC: hypothesis over the Serving messages ---------------------------------------------------

SERVING = serving_pb2.DESCRIPTOR.services_by_name["Serving"]


def meaningful_texts(live: LiveRouter) -> Callable[[FieldDescriptor], st.SearchStrategy[str]]:
    """Strings for a field: words that reach deep paths (the served model, roles, tool-choice modes,
    JSON Schema text) mixed with arbitrary Unicode."""
    anything = st.text(max_size=40)
    words = st.sampled_from(
        [live.model_name, "", "user", "system", "assistant", "tool", "none", "auto", "required", "f", "hello there"]
    )
    json_text = st.sampled_from(['{"type": "object"}', "{}", "[]", "null", "{", '{"type": "object", "properties": 1}'])
    served = st.sampled_from([live.model_name, ""])
    by_name = {
        "model": st.one_of(served, served, served, anything),  # mostly the served one: an unknown model stops early
        "parameters_json": st.one_of(json_text, anything),
        "arguments_json": st.one_of(json_text, anything),
    }

    def texts(f: FieldDescriptor) -> st.SearchStrategy[str]:
        return by_name.get(f.name, st.one_of(words, anything))

    return texts


def field_roots(descriptor: Any) -> set[str]:
    """Names an INVALID_ARGUMENT message may start with: the request's fields and oneofs."""
    return {f.name for f in descriptor.fields} | {o.name for o in descriptor.oneofs}


def grpc_fuzz(live: LiveRouter, examples: int) -> Findings:
    findings = Findings()
    texts = meaningful_texts(live)
    metadata = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(live.grpc_target) as channel:
        for method in SERVING.methods:
            call = _callable(channel, method)
            roots = field_roots(method.input_type)

            def run(request: Any, method: MethodDescriptor = method, call: Any = call, roots: set[str] = roots) -> None:
                status, details = call(request, metadata)
                findings.statuses[(method.name, status.name)] += 1
                if status not in ALLOWED_GRPC:
                    findings.fail(f"{method.name}: {status.name} {details!r}\nrequest: {request!r}")
                elif status == grpc.StatusCode.INVALID_ARGUMENT:
                    named = re.match(r"([A-Za-z_]+)[\w.\[\]]*: \S", details or "")
                    if named is None or named.group(1) not in roots:
                        findings.fail(
                            f"{method.name}: INVALID_ARGUMENT names no field: {details!r}\nrequest: {request!r}"
                        )

            fuzz(message_strategy(method.input_type, texts), examples, run)
    return findings


def _callable(channel: grpc.Channel, method: MethodDescriptor) -> Callable[[Any, Any], tuple[grpc.StatusCode, str]]:
    """Call ``method`` to its end (streams are read through): -> (status, details)."""
    path = f"/{SERVING.full_name}/{method.name}"
    response = GetMessageClass(method.output_type)
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    stub: Any = kind(
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response.FromString
    )

    def call(request: Any, metadata: Any) -> tuple[grpc.StatusCode, str]:
        try:
            answer = stub(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
            if method.server_streaming:
                for _ in answer:
                    pass
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details() or ""

    return call


def check_grpc(live: LiveRouter, examples: int) -> None:
    findings = grpc_fuzz(live, examples)
    statuses = findings.by_status()
    report(
        "test_fuzz grpc",
        f"{findings.cases} gRPC fuzz calls, {len(findings.failures)} failed checks; statuses {statuses}",
    )
    assert findings.failures == [], "\n\n".join(findings.failures)
    assert {m.name for m in SERVING.methods} == {op for op, _ in findings.statuses}  # every method was called
    assert findings.ok("Generate") + findings.ok("Chat") > 0, findings.statuses  # some calls generated
    assert_quiescent(live)


def test_grpc_fuzz_never_answers_internal_and_names_the_bad_field(live: LiveRouter) -> None:
    check_grpc(live, FAST_EXAMPLES * 2)


@pytest.mark.slow
def test_grpc_fuzz_long_run(live: LiveRouter) -> None:
    check_grpc(live, SLOW_EXAMPLES * 2)


def test_the_openapi_document_describes_every_body(live: LiveRouter) -> None:
    """The fuzzer generates from these: each POST documents its JSON body, each route its answers."""
    document = httpx.get(f"{live.http_url}/openapi.json", headers=AUTH, timeout=CALL_TIMEOUT_S).json()
    posts = {path: ops["post"] for path, ops in document["paths"].items() if "post" in ops}
    assert set(posts) >= {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/tokenize", "/detokenize"}
    for path, operation in posts.items():
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema.get("properties"), path
        assert "200" in operation["responses"] and "4XX" in operation["responses"], path
    chat = posts["/v1/chat/completions"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["model"]["enum"] == [live.model_name]


# -- what the fuzzers found, kept fixed -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        # a list or an object as a role or a part type: was a 500 (TypeError: unhashable type)
        ("/v1/chat/completions", {"messages": [{"role": [], "content": "hi"}]}, "messages[0].role"),
        ("/tokenize", {"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": [], "text": "x"}]}]},
            "messages[0].content[0].type",
        ),
        # more prompts than the router ever runs at once: each waited for the others' slots, 429 after 30 s
        ("/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 1}, "prompt"),
        # min_tokens beyond the room a request ends up with: was the worker's 400 naming no field
        ("/v1/completions", {"prompt": "hi", "min_tokens": 5000}, "min_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "min_tokens": 5000}, "min_tokens"),
    ],
)
def test_fuzz_findings_are_400s_naming_the_field(live: LiveRouter, path: str, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{live.http_url}{path}", json=body, headers=AUTH, timeout=CALL_TIMEOUT_S)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] == param, response.text[:300]


def test_grpc_fuzz_findings_name_the_field(live: LiveRouter) -> None:
    chat = serving_pb2.ChatRequest(tool_choice=serving_pb2.ToolChoice(function_name="f"))
    cases = [
        # Tokenize's chat errors named `messages` / `tool_choice`, not the request's `chat.*` field
        (serving_pb2.TokenizeRequest(chat=chat), "chat.tool_choice"),
        (serving_pb2.TokenizeRequest(chat=serving_pb2.ChatRequest()), "chat.messages"),
        # min_tokens beyond the room: the worker's error, naming no field
        (
            serving_pb2.GenerateRequest(text="hi", sampling=serving_pb2.SamplingParams(min_tokens=5000)),
            "sampling.min_tokens",
        ),
    ]
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        for request, field_name in cases:
            call = stub.Tokenize if isinstance(request, serving_pb2.TokenizeRequest) else stub.Generate
            with pytest.raises(grpc.RpcError) as failed:
                answer = call(request, metadata=(("x-api-key", KEY),), timeout=CALL_TIMEOUT_S)
                list(answer) if not isinstance(answer, serving_pb2.TokenizeResponse) else None
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
            assert (failed.value.details() or "").startswith(f"{field_name}:"), failed.value.details()
