"""Router-level fault tests, poison requests (reliability.md §4.2 test 13) against a live router.

Poison (NaN / huge / string temperatures, huge ``n``, response formats and schemas this server cannot
honour, bad tools, lone surrogates; on REST and gRPC) is sent interleaved with valid greedy load on
the disaggregated path: the poison gets 4xx (INVALID_ARGUMENT on gRPC), the valid requests are 100%
served with the oracle's tokens, no 5xx, and the ranks neither fail nor drain. A client request id
used twice at once is only echoed: both requests run undisturbed under distinct server ids. The
table-driven bad-input rows are in test_bad_input.py; these add the interleaving under load.
"""

from __future__ import annotations

import functools
import json
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from request_ledger import Ledger, report
from router_faults import (
    BIG_CACHE,
    COMPLETIONS,
    DISAGGREGATED,
    QUIET_S,
    REQUEST_S,
    Oracle,
    Streamed,
    completion,
    http_5xx,
    leaked_blocks,
    prompts,
    run_ledgered,
    served_job,
    take_line,
)
from router_fixtures import LiveRouter, live_router

from k2serve.proto import serving_pb2, serving_pb2_grpc
from k2serve.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("faults") / "tiny", seed=11)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


# -- test 13: poison requests interleaved with valid load --------------------------------------------------

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
_CHAT_BASE = '"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4'
_TOOL = '{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}'
POISON: list[tuple[str, str, str]] = [  # (name, path, the body's JSON text, verbatim)
    ("temperature-nan", COMPLETIONS, '{"prompt": [5, 6, 7], "max_tokens": 4, "temperature": NaN}'),
    ("temperature-1e400", COMPLETIONS, '{"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 1e400}'),
    ("temperature-string", COMPLETIONS, '{"prompt": [5, 6, 7], "max_tokens": 4, "temperature": "hot"}'),
    ("n-2^40", CHAT, "{" + _CHAT_BASE + ', "n": 1099511627776, "temperature": 1}'),
    ("n-1000", COMPLETIONS, '{"prompt": [5, 6, 7], "max_tokens": 4, "n": 1000, "temperature": 1}'),
    ("json-schema-missing", CHAT, "{" + _CHAT_BASE + ', "response_format": {"type": "json_schema"}}'),
    (
        "json-schema-catastrophic-regex",
        CHAT,
        "{" + _CHAT_BASE + ', "response_format": {"type": "json_schema", "json_schema": {"name": "x", '
        '"schema": {"type": "string", "pattern": "(a+)+$"}}}}',
    ),
    ("regex-format", COMPLETIONS, '{"prompt": "hi", "max_tokens": 4, "response_format": {"type": "regex", "regex": "a**"}}'),
    ("tool-parameters-string", CHAT, "{" + _CHAT_BASE + ', "tools": [{"type": "function", "function": {"name": "get", "parameters": "x"}}]}'),
    ("tools-duplicate", CHAT, "{" + _CHAT_BASE + f', "tools": [{_TOOL}, {_TOOL}]' + "}"),
    ("tool-choice-absent", CHAT, "{" + _CHAT_BASE + f', "tools": [{_TOOL}], "tool_choice": {{"type": "function", "function": {{"name": "nope"}}}}' + "}"),
    ("lone-surrogate-prompt", COMPLETIONS, '{"prompt": "a\\ud800b", "max_tokens": 4}'),
    ("lone-surrogate-chat", CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}'),
    ("messages-temperature-nan", MESSAGES, '{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("messages-tool-schema-string", MESSAGES, '{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "get", "input_schema": "x"}]}'),
]  # fmt: skip
GRPC_POISON: list[tuple[str, dict[str, Any]]] = [
    ("grpc-temperature-nan", {"temperature": float("nan"), "max_tokens": 4}),
    ("grpc-top-p-0", {"top_p": 0.0, "max_tokens": 4}),
    ("grpc-n-1000", {"n": 1000, "temperature": 1.0, "max_tokens": 4}),
    ("grpc-max-tokens-negative", {"max_tokens": -1}),
]


@pytest.fixture(scope="module")
def poisoned(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir, roles=DISAGGREGATED, **BIG_CACHE) as live:
        yield live


def post_raw(url: str, path: str, text: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=REQUEST_S) as client:
        return client.post(
            path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}
        )


def poison_outcome_of(url: str, path: str, text: str) -> str:
    return poison_outcome(post_raw(url, path, text).status_code)


def poison_outcome(status: int) -> str:
    return f"error: http {status} (poison refused)" if 400 <= status < 500 else f"wrong: poison got http {status}"


def grpc_generate(
    target: str, prompt: list[int], sampling: dict[str, Any], request_id: str = ""
) -> tuple[list[int], dict[str, str], str]:
    """One ``Serving.Generate`` call: its token ids, its initial metadata, its status code name."""
    with grpc.insecure_channel(target) as channel:
        call = serving_pb2_grpc.ServingStub(channel).Generate(
            serving_pb2.GenerateRequest(
                token_ids=serving_pb2.TokenIds(ids=prompt),
                sampling=serving_pb2.SamplingParams(**sampling),
                request_id=request_id,
            ),
            timeout=REQUEST_S,
        )
        try:
            tokens = [t for message in call for t in message.token_ids]
        except grpc.RpcError:
            tokens = []
        return tokens, dict(call.initial_metadata() or ()), call.code().name


def test_poison_requests_get_4xx_while_valid_load_is_served_and_the_workers_stay_up(
    poisoned: LiveRouter, oracle: Oracle
) -> None:
    live, ledger = poisoned, Ledger()
    greedy16 = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}
    jobs: dict[str, Callable[[], str]] = {}
    for i, prompt in enumerate(prompts(8, seed=13)):
        jobs[f"valid-rest-{i}"] = served_job(live.http_url, oracle, prompt, 16)
    for i, prompt in enumerate(prompts(4, seed=14)):

        def valid_grpc(p: list[int] = prompt) -> str:
            tokens, _, code = grpc_generate(live.grpc_target, p, greedy16)
            return "ok" if code == "OK" and tokens == oracle(p, 16) else f"wrong: {code}, {len(tokens)} tokens"

        jobs[f"valid-grpc-{i}"] = valid_grpc
    for name, path, text in POISON:
        jobs[name] = functools.partial(poison_outcome_of, live.http_url, path, text)
    for name, sampling in GRPC_POISON:

        def poison_grpc(s: dict[str, Any] = sampling) -> str:
            _, _, code = grpc_generate(live.grpc_target, [5, 6, 7], s)
            return f"error: {code} (poison refused)" if code == "INVALID_ARGUMENT" else f"wrong: poison got {code}"

        jobs[name] = poison_grpc
    order = list(jobs)
    random.Random(13).shuffle(order)  # poison interleaved with the valid requests
    run_ledgered(ledger, {name: jobs[name] for name in order}, workers=8)
    live.wait_quiet(QUIET_S)
    loads = live.loads()
    report(
        "test_fault_poison::poison_requests",
        ledger.figure(len(POISON) + len(GRPC_POISON), leaked_blocks=leaked_blocks(live))
        + f"; {len(POISON) + len(GRPC_POISON)} poison refused with 4xx / INVALID_ARGUMENT",
    )
    ledger.assert_none()
    assert all(ledger.results[name].kind == "ok" for name in jobs if name.startswith("valid-"))
    assert http_5xx(live) == 0
    assert all(not load.draining for load in loads) and all(w.engine.failure is None for w in live.workers)
    assert httpx.get(live.http_url + "/health", timeout=10).status_code == 200


def test_a_duplicate_client_request_id_never_disturbs_the_first_request(poisoned: LiveRouter, oracle: Oracle) -> None:
    """The client's id (REST ``x-request-id``, gRPC ``request_id``) is only echoed: two requests that
    share one, the second sent while the first runs, both run to the end with the oracle's tokens
    under distinct server ids."""
    live, ledger = poisoned, Ledger()
    first_prompt, second_prompt = prompts(2, seed=21)
    header = {"x-request-id": "dup-1"}
    started = threading.Event()
    ids: dict[str, str] = {}

    def first() -> str:
        with httpx.Client(base_url=live.http_url, timeout=REQUEST_S) as client:
            with client.stream("POST", COMPLETIONS, json=completion(first_prompt, 64), headers=header) as response:
                streamed = Streamed(response.status_code, dict(response.headers))
                for line in response.iter_lines():
                    take_line(streamed, line)
                    if line.startswith("data: {") and "id" not in ids:
                        ids["first"] = json.loads(line[5:])["id"]
                        started.set()
        return streamed.outcome(oracle(first_prompt, 64))

    def second() -> str:
        if not started.wait(REQUEST_S):
            return "wrong: the first request never started"
        with httpx.Client(base_url=live.http_url, timeout=REQUEST_S) as client:
            answer = client.post(COMPLETIONS, json=completion(second_prompt, 16, stream=False), headers=header)
        if answer.status_code != 200:
            return f"error: http {answer.status_code}"
        ids["second"] = answer.json()["id"]
        same = answer.json()["choices"][0]["token_ids"] == oracle(second_prompt, 16)
        return "ok" if same else "wrong: tokens differ from the oracle"

    def grpc_twin(prompt: list[int]) -> Callable[[], str]:
        def call() -> str:
            tokens, metadata, code = grpc_generate(
                live.grpc_target, prompt, {"temperature": 0.0, "max_tokens": 32, "ignore_eos": True}, "dup-2"
            )
            ids[f"grpc-{prompt[0]}"] = metadata.get("x-k2serve-id", "")
            assert metadata.get("x-request-id") == "dup-2"
            return "ok" if code == "OK" and tokens == oracle(prompt, 32) else f"wrong: {code}"

        return call

    run_ledgered(
        ledger,
        {
            "rest-first": first,
            "rest-second": second,
            "grpc-a": grpc_twin(first_prompt),
            "grpc-b": grpc_twin(second_prompt),
        },
    )
    report("test_fault_poison::duplicate_request_ids", ledger.figure(2, leaked_blocks=leaked_blocks(live)))
    ledger.assert_none()
    assert ledger.kinds() == {"ok": 4}
    assert len(set(ids.values())) == 4 and all(ids.values())  # four server ids, all distinct
    live.wait_quiet(QUIET_S)


def test_structured_output_extensions_this_server_cannot_honour_are_refused(poisoned: LiveRouter) -> None:
    for name, value in (
        ("guided_regex", "a**"),
        ("guided_json", {"type": "bogus"}),
        ("structured_outputs", {"regex": "a"}),
    ):
        body = {"prompt": [5, 6, 7], "max_tokens": 2, name: value}
        assert httpx.post(poisoned.http_url + COMPLETIONS, json=body, timeout=REQUEST_S).status_code == 400, name
