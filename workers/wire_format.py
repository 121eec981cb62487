"""Conversions between the worker's protobuf messages (``proto/worker.proto``) and engine types.

Lifecycle: pure functions, called by the gRPC service on every request and delta. The one rule
that matters: proto3 zero values are not the semantic defaults, so every ``optional`` field that
is unset maps to the ``SamplingParams`` default, and validation errors name the proto field.
"""

from __future__ import annotations

from collections.abc import Sequence

from k2serve.proto import worker_pb2
from k2serve.workers.engine import RequestOutput, Usage
from k2serve.workers.sampler import TokenLogprobs
from k2serve.workers.sampling_params import SamplingParams

_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "logprobs",
    "n",
    "max_reasoning_tokens",
)
_PLAIN = ("min_p", "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos")


def sampling_from_proto(message: worker_pb2.SamplingParams) -> SamplingParams:
    """Raises ``SamplingParamsError`` naming the field for out-of-range values."""
    kwargs: dict[str, object] = {name: getattr(message, name) for name in _OPTIONAL if message.HasField(name)}
    kwargs |= {name: getattr(message, name) for name in _PLAIN}
    kwargs["stop_token_ids"] = tuple(message.stop_token_ids)
    kwargs["reasoning_end_token_ids"] = tuple(message.reasoning_end_token_ids)
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def sampling_to_proto(params: SamplingParams) -> worker_pb2.SamplingParams:
    message = worker_pb2.SamplingParams(
        stop_token_ids=list(params.stop_token_ids), reasoning_end_token_ids=list(params.reasoning_end_token_ids)
    )
    for name in (*_OPTIONAL, *_PLAIN):
        value = getattr(params, name)
        if value is not None:
            setattr(message, name, value)
    return message


def usage_to_proto(usage: Usage) -> worker_pb2.Usage:
    return worker_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        transferred_tokens=usage.transferred_tokens,
    )


def logprobs_to_proto(records: Sequence[object] | None) -> list[worker_pb2.TokenLogprob]:
    out = []
    for record in records or ():
        if not isinstance(record, TokenLogprobs):
            continue
        top = [
            worker_pb2.TopLogprob(token_id=t, logprob=lp)
            for t, lp in zip(record.top_token_ids, record.top_logprobs, strict=True)
        ]
        out.append(worker_pb2.TokenLogprob(token_id=record.token_id, logprob=record.logprob, rank=record.rank, top=top))
    return out


def delta_to_proto(output: RequestOutput) -> worker_pb2.TokenDelta:
    delta = worker_pb2.TokenDelta(
        request_id=output.request_id,
        index=output.index,
        token_ids=list(output.new_token_ids),
        logprobs=logprobs_to_proto(output.logprobs),
        finish_reason=output.finish_reason or "",
        error=output.error or "",
    )
    if output.usage is not None:
        delta.usage.CopyFrom(usage_to_proto(output.usage))
    return delta
