"""Kimi K2 Thinking output parsers: reasoning, content and tool calls from the ids the model emits.

Sequences are built the way the model emits them (reference §5–6): text encoded by the tiny model's
real tokenizer, markers as their special ids. The tiny vocabulary splits CJK and emoji into byte
tokens, so multi-byte characters straddle token (and delta) boundaries throughout. Every scenario is
also streamed in seeded random splits and must give the non-streaming result.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from k2serve.router.chat_template import ChatTemplate
from k2serve.router.kimi_output import (
    ContentDelta,
    Delta,
    KimiOutputStream,
    ParsedOutput,
    ReasoningDelta,
    ToolCall,
    ToolCallArguments,
    ToolCallStart,
    count_history_tool_calls,
    parse_output,
    parse_tool_call_id,
    prompt_opens_reasoning,
    tool_call_id,
)
from k2serve.router.kimi_vocab import (
    IM_END,
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)
from k2serve.router.reasoning_parser import ReasoningParser
from k2serve.router.tokenizer import KimiTokenizer, TokenIdError
from k2serve.router.tool_call_parser import ToolCallParser, name_from_model_id
from k2serve.tiny_model import make_tiny_model

MARKERS = (
    THINK_BEGIN,
    THINK_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_END,
)
SB, SE, CB, AB, CE = (
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_END,
)
WEATHER_ARGS = '{"city": "Paris"}'
UNICODE_ARGS = (
    '{"q": "天气 ☀️ in Zürich 😀", "opts": {"units": ["c", "f"], "deep": {"x": [1, {"y": null}], "s": "a\\"b"}}}'
)
RANDOM_SPLITS = 50


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("kimi_parsers") / "tiny")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> KimiTokenizer:
    return KimiTokenizer.from_model_dir(model_dir)


def emit(tok: KimiTokenizer, *parts: str) -> list[int]:
    """Ids as the model emits them: each marker name is its one special id, text is BPE-encoded."""
    ids: list[int] = []
    for part in parts:
        if part in tok.special_tokens:
            ids.append(tok.special_tokens[part])
        else:
            ids.extend(tok.encode(part, allow_special=False))
    return ids


def call(model_id: str, arguments: str, *, end: bool = True) -> tuple[str, ...]:
    return (CB, model_id, AB, arguments, *((CE,) if end else ()))


# -- streaming helpers -----------------------------------------------------------------------------


@dataclass
class Streamed:
    deltas: list[Delta]
    output: ParsedOutput


@dataclass(frozen=True)
class Options:
    """The per-request options of ``KimiOutputStream`` / ``parse_output``."""

    thinking: bool = True
    start_in_reasoning: bool = False
    first_tool_index: int = 0


def stream_in(
    tok: KimiTokenizer, ids: Sequence[int], cuts: Sequence[int], finish_reason: str = "stop", opts: Options = Options()
) -> Streamed:
    stream = KimiOutputStream(
        tok, thinking=opts.thinking, start_in_reasoning=opts.start_in_reasoning, first_tool_index=opts.first_tool_index
    )
    deltas: list[Delta] = []
    bounds = [0, *cuts, len(ids)]
    for lo, hi in itertools.pairwise(bounds):
        deltas.extend(stream.push(ids[lo:hi]))
    deltas.extend(stream.finish(finish_reason))
    return Streamed(deltas, join(deltas, stream))


def join(deltas: Sequence[Delta], stream: KimiOutputStream) -> ParsedOutput:
    """Concatenate deltas the way an API client does, checking the stream is well formed."""
    reasoning: list[str] = []
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    starts: dict[int, ToolCallStart] = {}
    for delta in deltas:
        if isinstance(delta, ReasoningDelta):
            assert delta.text and not content and not calls, "reasoning after the answer began"
            reasoning.append(delta.text)
        elif isinstance(delta, ContentDelta):
            assert delta.text
            content.append(delta.text)
        elif isinstance(delta, ToolCallStart):
            assert delta.index == len(starts), "tool-call indices are dense and in order"
            starts[delta.index] = delta
            calls[delta.index] = []
        else:
            assert isinstance(delta, ToolCallArguments)
            assert delta.index in starts and delta.index == max(starts), "arguments only for the open call"
            assert delta.text
            calls[delta.index].append(delta.text)
    complete = {c.index: c.complete for c in stream.tool_calls}
    tool_calls = tuple(ToolCall(i, s.id, s.name, "".join(calls[i]), complete[i]) for i, s in sorted(starts.items()))
    assert stream.finish_reason is not None
    return ParsedOutput("".join(reasoning), "".join(content), tool_calls, stream.finish_reason, stream.reasoning_tokens)


def check_splits(
    tok: KimiTokenizer,
    ids: Sequence[int],
    finish_reason: str = "stop",
    seed: int = 0,
    *,
    thinking: bool = True,
    start_in_reasoning: bool = False,
    first_tool_index: int = 0,
) -> ParsedOutput:
    """Non-streaming result == streamed result for one-id deltas, one delta, and 50 random splits."""
    opts = Options(thinking, start_in_reasoning, first_tool_index)
    expected = parse_output(
        tok,
        ids,
        finish_reason=finish_reason,
        thinking=thinking,
        start_in_reasoning=start_in_reasoning,
        first_tool_index=first_tool_index,
    )
    rng = random.Random(seed)
    splits: list[list[int]] = [[], list(range(1, len(ids)))]
    for _ in range(RANDOM_SPLITS):
        k = rng.randrange(len(ids) + 1)
        splits.append(sorted(rng.sample(range(len(ids) + 1), k)))
    for cuts in splits:
        got = stream_in(tok, ids, cuts, finish_reason, opts)
        assert got.output == expected, cuts
    return expected


def no_marker_text(out: ParsedOutput) -> None:
    for text in (out.reasoning, out.content, *(c.arguments for c in out.tool_calls)):
        for marker in (*MARKERS, IM_END):
            assert marker not in text


# -- the vocabulary assumptions ----------------------------------------------------------------------


def test_markers_are_single_special_ids_and_text_straddles_tokens(tok: KimiTokenizer) -> None:
    for marker in (*MARKERS, IM_END):
        (marker_id,) = tok.encode(marker)
        assert marker_id == tok.special_tokens[marker] >= tok.num_base_tokens
    # a CJK character and an emoji are several byte tokens here: splits land inside characters
    assert len(tok.encode("世")) > 1
    assert len(tok.encode("😀")) > 1


# -- reasoning --------------------------------------------------------------------------------------


def test_plain_content(tok: KimiTokenizer) -> None:
    out = check_splits(tok, emit(tok, "Hello, world! 你好", IM_END))
    assert out == ParsedOutput("", "Hello, world! 你好", (), "stop", 0)


def test_reasoning_then_content(tok: KimiTokenizer) -> None:
    ids = emit(tok, THINK_BEGIN, "Let me think: 2+2.", THINK_END, "The answer is 4.", IM_END)
    out = check_splits(tok, ids)
    assert (out.reasoning, out.content, out.tool_calls, out.finish_reason) == (
        "Let me think: 2+2.",
        "The answer is 4.",
        (),
        "stop",
    )
    assert out.reasoning_tokens == len(emit(tok, THINK_BEGIN, "Let me think: 2+2.", THINK_END))


def test_reasoning_streams_before_it_ends(tok: KimiTokenizer) -> None:
    stream = KimiOutputStream(tok)
    assert stream.push(emit(tok, THINK_BEGIN, "step one")) == [ReasoningDelta("step one")]
    assert stream.push(emit(tok, THINK_END, "done")) == [ContentDelta("done")]
    assert stream.finish("stop") == []


def test_empty_reasoning_emits_no_reasoning_delta(tok: KimiTokenizer) -> None:
    ids = emit(tok, THINK_BEGIN, THINK_END, "answer")
    out = check_splits(tok, ids)
    assert (out.reasoning, out.content, out.reasoning_tokens) == ("", "answer", 2)
    assert not any(isinstance(d, ReasoningDelta) for d in stream_in(tok, ids, []).deltas)


def test_prompt_that_opened_think_starts_in_reasoning(tok: KimiTokenizer) -> None:
    ids = emit(tok, "thinking already", THINK_END, "answer")
    assert check_splits(tok, ids, start_in_reasoning=True).reasoning == "thinking already"
    # a leading <think> is consumed as well
    ids = emit(tok, THINK_BEGIN, "again", THINK_END, "answer")
    out = check_splits(tok, ids, start_in_reasoning=True)
    assert (out.reasoning, out.content) == ("again", "answer")


def test_output_without_think_is_content_and_a_stray_end_is_dropped(tok: KimiTokenizer) -> None:
    out = check_splits(tok, emit(tok, "no reasoning", THINK_END, " here"))
    assert (out.reasoning, out.content) == ("", "no reasoning here")


def test_unterminated_reasoning_is_all_reasoning(tok: KimiTokenizer) -> None:
    out = check_splits(tok, emit(tok, THINK_BEGIN, "still thinking 世"), finish_reason="length")
    assert (out.reasoning, out.content, out.finish_reason) == ("still thinking 世", "", "length")


def test_thinking_disabled_makes_everything_content(tok: KimiTokenizer) -> None:
    ids = emit(tok, THINK_BEGIN, "hmm", THINK_END, "answer", SB, *call("functions.f:0", "{}"), SE)
    out = check_splits(tok, ids, thinking=False, start_in_reasoning=True)
    assert (out.reasoning, out.content, out.reasoning_tokens) == ("", "hmmanswer", 0)
    assert [c.name for c in out.tool_calls] == ["f"] and out.finish_reason == "tool_calls"


def test_prompt_opens_reasoning_looks_only_at_the_last_assistant_turn(tok: KimiTokenizer) -> None:
    template = ChatTemplate.shipped()
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "easy"},
        {"role": "user", "content": "3+3?"},
    ]
    prompt = tok.encode(template.render(messages))
    assert tok.special_tokens[THINK_END] in prompt  # history holds an earlier </think>
    assert not prompt_opens_reasoning(tok, prompt)
    assert prompt_opens_reasoning(tok, [*prompt, tok.special_tokens[THINK_BEGIN]])
    assert prompt_opens_reasoning(tok, [*prompt, tok.special_tokens[THINK_BEGIN], *tok.encode("partial")])
    assert not prompt_opens_reasoning(tok, [])


def test_stray_specials_inside_reasoning_are_dropped(tok: KimiTokenizer) -> None:
    ids = emit(tok, THINK_BEGIN, "a", THINK_BEGIN, "b", CE, "c", AB, SE, IM_END, "d", THINK_END, "e", IM_END)
    out = check_splits(tok, ids)
    assert (out.reasoning, out.content, out.tool_calls) == ("abcd", "e", ())


# -- tool calls -------------------------------------------------------------------------------------


def test_single_call_after_reasoning(tok: KimiTokenizer) -> None:
    ids = emit(
        tok, THINK_BEGIN, "Need the tool.", THINK_END, SB, *call("functions.get_weather:0", WEATHER_ARGS), SE, IM_END
    )
    out = check_splits(tok, ids)
    assert out == ParsedOutput(
        "Need the tool.",
        "",
        (ToolCall(0, "functions.get_weather:0", "get_weather", WEATHER_ARGS, True),),
        "tool_calls",
        len(emit(tok, THINK_BEGIN, "Need the tool.", THINK_END)),
    )


def test_missing_think_end_before_the_section_ends_reasoning(tok: KimiTokenizer) -> None:
    """Anchors §4A item 4: the call must not be swallowed into reasoning."""
    ids = emit(tok, THINK_BEGIN, "I will call it", SB, *call("functions.get_weather:0", WEATHER_ARGS), SE, IM_END)
    out = check_splits(tok, ids)
    assert (out.reasoning, out.content, out.finish_reason) == ("I will call it", "", "tool_calls")
    assert out.tool_calls == (ToolCall(0, "functions.get_weather:0", "get_weather", WEATHER_ARGS, True),)
    no_marker_text(out)
    # likewise when the section marker itself is missing and the call begins directly
    ids = emit(tok, THINK_BEGIN, "x", *call("functions.get_weather:0", WEATHER_ARGS), SE)
    out = check_splits(tok, ids)
    assert (out.reasoning, [c.name for c in out.tool_calls]) == ("x", ["get_weather"])


def test_several_calls_in_one_section_with_conversation_global_ids(tok: KimiTokenizer) -> None:
    """Anchors §4A item 2; the model's own idx is replaced by the conversation count (SGLang #10612)."""
    ids = emit(
        tok,
        THINK_BEGIN,
        "two lookups",
        THINK_END,
        "Checking both.",
        SB,
        *call("functions.get_weather:0", WEATHER_ARGS),
        "\n",
        *call("functions.search_web:0", '{"query": "news", "max_results": 5}'),
        *call("functions.get_weather:7", '{"city": "Oslo"}'),
        SE,
        IM_END,
    )
    out = check_splits(tok, ids, first_tool_index=3)
    assert out.content == "Checking both."
    assert out.tool_calls == (
        ToolCall(0, "functions.get_weather:3", "get_weather", WEATHER_ARGS, True),
        ToolCall(1, "functions.search_web:4", "search_web", '{"query": "news", "max_results": 5}', True),
        ToolCall(2, "functions.get_weather:5", "get_weather", '{"city": "Oslo"}', True),
    )
    assert out.finish_reason == "tool_calls"


def test_unicode_and_nested_json_arguments_pass_through_verbatim(tok: KimiTokenizer) -> None:
    ids = emit(tok, THINK_BEGIN, "想一想", THINK_END, SB, *call("functions.lookup:0", UNICODE_ARGS), SE)
    out = check_splits(tok, ids)
    assert out.reasoning == "想一想"
    (only,) = out.tool_calls
    assert only.arguments == UNICODE_ARGS  # raw text, not re-serialized
    assert json.loads(only.arguments)["q"] == "天气 ☀️ in Zürich 😀"


def test_invalid_json_arguments_are_passed_on_raw(tok: KimiTokenizer) -> None:
    ids = emit(tok, SB, *call("functions.f:0", "{'not': json,"), SE)
    assert check_splits(tok, ids).tool_calls[0].arguments == "{'not': json,"


def test_whitespace_around_id_and_arguments_is_ignored(tok: KimiTokenizer) -> None:
    ids = emit(tok, SB, "\n", CB, "  functions.get_weather:0 \n", AB, ' \n {"city":  "Paris"}\n  ', CE, "\n", SE)
    (only,) = check_splits(tok, ids).tool_calls
    assert (only.name, only.arguments, only.complete) == ("get_weather", '{"city":  "Paris"}', True)


def test_section_cut_off_mid_arguments_reports_the_partial_call(tok: KimiTokenizer) -> None:
    """Anchors §4A item 6: a max_tokens cut keeps the calls instead of dropping them all."""
    cut = '{"query": "électricité 电'
    ids = emit(tok, THINK_BEGIN, "r", THINK_END, SB, *call("functions.search:0", cut, end=False))
    out = check_splits(tok, ids, finish_reason="length")
    assert out.tool_calls == (ToolCall(0, "functions.search:0", "search", cut, False),)
    assert out.finish_reason == "length"  # no complete call
    # with a complete call before it, both are reported and the finish reason is tool_calls
    ids = emit(tok, SB, *call("functions.a:0", "{}"), *call("functions.b:1", '{"x": [1, 2', end=False))
    out = check_splits(tok, ids, finish_reason="length")
    assert [(c.name, c.arguments, c.complete) for c in out.tool_calls] == [
        ("a", "{}", True),
        ("b", '{"x": [1, 2', False),
    ]
    assert out.finish_reason == "tool_calls"


def test_cut_off_inside_a_multibyte_argument_character_ends_in_a_replacement(tok: KimiTokenizer) -> None:
    ids = emit(tok, SB, CB, "functions.f:0", AB, '{"a": "世')[:-1]  # drop the last byte of 世
    (only,) = check_splits(tok, ids, finish_reason="length").tool_calls
    assert only.arguments == '{"a": "\ufffd' and not only.complete


def test_section_cut_off_mid_name(tok: KimiTokenizer) -> None:
    # the name may be incomplete: the call is not reported
    out = check_splits(tok, emit(tok, THINK_BEGIN, "r", THINK_END, SB, CB, "functions.get_wea"), finish_reason="length")
    assert (out.reasoning, out.content, out.tool_calls, out.finish_reason) == ("r", "", (), "length")
    # once ':' follows the name it is known: reported with no arguments, incomplete
    out = check_splits(tok, emit(tok, SB, CB, "functions.get_weather:"), finish_reason="length")
    assert out.tool_calls == (ToolCall(0, "functions.get_weather:0", "get_weather", "", False),)
    out = check_splits(tok, emit(tok, SB, CB, "functions.get_weather:0", AB), finish_reason="length")
    assert out.tool_calls == (ToolCall(0, "functions.get_weather:0", "get_weather", "", False),)
    # cut right after the section or call begins
    for ids in (emit(tok, "text", SB), emit(tok, "text", SB, CB)):
        assert check_splits(tok, ids, finish_reason="length") == ParsedOutput("", "text", (), "length", 0)


def test_text_after_the_section_is_content(tok: KimiTokenizer) -> None:
    ids = emit(tok, "before ", SB, *call("functions.f:0", "{}"), SE, " after", IM_END)
    out = check_splits(tok, ids)
    assert (out.content, out.finish_reason) == ("before  after", "tool_calls")


def test_stray_markers_outside_a_section_are_dropped(tok: KimiTokenizer) -> None:
    """Anchors §4A item 3: no raw marker text ever reaches content."""
    ids = emit(
        tok, THINK_BEGIN, "r", THINK_END, "a", CE, "b", AB, "c", SE, "d", THINK_BEGIN, "e", THINK_END, "f", IM_END
    )
    out = check_splits(tok, ids)
    assert (out.reasoning, out.content, out.tool_calls, out.finish_reason) == ("r", "abcdef", (), "stop")
    no_marker_text(out)
    # inside a section: text between calls, a repeated section begin and stray argument markers go
    ids = emit(tok, SB, "junk", SB, CE, *call("functions.f:0", '{"k": 1}'), AB, "junk", SE)
    out = check_splits(tok, ids)
    assert (out.content, [(c.name, c.arguments) for c in out.tool_calls]) == ("", [("f", '{"k": 1}')])


def test_call_begin_outside_a_section_opens_one(tok: KimiTokenizer) -> None:
    ids = emit(tok, "Sure.", *call("functions.f:0", '{"a": 1}'), SE, "Done.")
    out = check_splits(tok, ids)
    assert (out.content, [c.arguments for c in out.tool_calls], out.finish_reason) == (
        "Sure.Done.",
        ['{"a": 1}'],
        "tool_calls",
    )


def test_calls_closed_by_the_next_marker_are_complete(tok: KimiTokenizer) -> None:
    ids = emit(tok, SB, CB, "functions.a:0", AB, "{}", CB, "functions.b:1", AB, '{"x": 2}', SE, "tail")
    out = check_splits(tok, ids)
    assert [(c.name, c.arguments, c.complete) for c in out.tool_calls] == [("a", "{}", True), ("b", '{"x": 2}', True)]
    assert out.content == "tail"
    # a call with no argument marker at all
    (only,) = check_splits(tok, emit(tok, SB, CB, "functions.ping:0", CE, SE)).tool_calls
    assert (only.name, only.arguments, only.complete) == ("ping", "", True)


def test_ids_that_name_no_function(tok: KimiTokenizer) -> None:
    # bare numeric id: no name, the call is dropped; a later call still gets index 0
    ids = emit(tok, SB, *call("0", '{"a": 1}'), *call("get_weather:1", WEATHER_ARGS), SE)
    out = check_splits(tok, ids, first_tool_index=2)
    assert out.tool_calls == (ToolCall(0, "functions.get_weather:2", "get_weather", WEATHER_ARGS, True),)
    # a dotted or dashed name survives (vLLM's split(".")[-1] and SGLang's [\w.]+ do not)
    (only,) = check_splits(tok, emit(tok, SB, *call("functions.ns.get-weather:0", "{}"), SE)).tool_calls
    assert only.name == "ns.get-weather"


def test_every_delta_boundary_next_to_every_marker(tok: KimiTokenizer) -> None:
    """A marker is one id, so a delta boundary falls just before or after it: try each, and both."""
    ids = emit(
        tok, THINK_BEGIN, "r世", SB, *call("functions.f:0", '{"a": "😀"}'), *call("functions.g:1", "{}"), SE, "t"
    )
    expected = parse_output(tok, ids)
    marker_ids = {tok.special_tokens[m] for m in MARKERS}
    for pos, token_id in enumerate(ids):
        if token_id in marker_ids:
            for cuts in ([pos], [pos + 1], [pos, pos + 1], [max(pos - 1, 0), pos, pos + 1, pos + 2]):
                assert stream_in(tok, ids, cuts).output == expected, cuts


def test_tool_call_start_waits_for_the_whole_name(tok: KimiTokenizer) -> None:
    stream = KimiOutputStream(tok, first_tool_index=1)
    assert stream.push(emit(tok, SB, CB, "functions.get_")) == []
    assert stream.push(emit(tok, "weather:0")) == []
    assert stream.push(emit(tok, AB)) == [ToolCallStart(0, "functions.get_weather:1", "get_weather")]
    assert stream.push(emit(tok, '{"city"')) == [ToolCallArguments(0, '{"city"')]
    assert stream.push(emit(tok, ': "Paris"} ')) == [ToolCallArguments(0, ': "Paris"}')]  # trailing space held
    assert stream.push(emit(tok, CE, SE)) == []
    assert stream.finish("stop") == [] and stream.finish_reason == "tool_calls"
    assert stream.tool_calls == (ToolCall(0, "functions.get_weather:1", "get_weather", WEATHER_ARGS, True),)


def test_reasoning_in_delta_order_then_content_then_calls(tok: KimiTokenizer) -> None:
    ids = emit(tok, THINK_BEGIN, "r", THINK_END, "c", SB, *call("functions.f:0", '{"k": "v"}'), SE)
    deltas = stream_in(tok, ids, list(range(1, len(ids)))).deltas
    kinds = [type(d).__name__ for d in deltas]
    assert kinds[0] == "ReasoningDelta" and kinds[1] == "ContentDelta" and kinds[2] == "ToolCallStart"
    assert deltas[2] == ToolCallStart(0, "functions.f:0", "f")
    assert set(kinds[3:]) == {"ToolCallArguments"}


# -- split invariance and UTF-8 -----------------------------------------------------------------------


def _random_sequence(tok: KimiTokenizer, rng: random.Random) -> list[int]:
    words = ["hello", " world", "世界", "😀", "☀️", " Zürich", "\n", '{"a": [1, {"b": "ü"}]}', "functions.f:0", " "]
    parts: list[str] = []
    for _ in range(rng.randrange(1, 25)):
        if rng.random() < 0.35:
            parts.append(rng.choice((*MARKERS, IM_END)))
        else:
            parts.append("".join(rng.choice(words) for _ in range(rng.randrange(1, 4))))
    return emit(tok, *parts)


def test_random_marker_soup_streams_like_non_streaming(tok: KimiTokenizer) -> None:
    rng = random.Random(1234)
    for case in range(20):
        ids = _random_sequence(tok, rng)
        reason = rng.choice(("stop", "length"))
        thinking, opened = rng.random() < 0.8, rng.random() < 0.3
        out = check_splits(tok, ids, reason, seed=case, thinking=thinking, start_in_reasoning=opened)
        no_marker_text(out)
        # every text part was encoded whole, so no split may surface a replacement character
        assert "\ufffd" not in repr(out)


def test_multibyte_characters_split_across_tokens_never_show_a_replacement(tok: KimiTokenizer) -> None:
    text = "世界😀☀️"
    ids = emit(
        tok,
        THINK_BEGIN,
        text,
        THINK_END,
        text,
        SB,
        *call("functions.f:0", json.dumps({"t": text}, ensure_ascii=False)),
        SE,
    )
    stream = KimiOutputStream(tok)
    deltas: list[Delta] = []
    for token_id in ids:
        step = stream.push(token_id)
        for delta in step:
            assert "\ufffd" not in getattr(delta, "text", "")
        deltas.extend(step)
    deltas.extend(stream.finish("stop"))
    out = join(deltas, stream)
    assert (out.reasoning, out.content, json.loads(out.tool_calls[0].arguments)["t"]) == (text, text, text)


def test_output_cut_inside_a_character_matches_a_one_shot_decode(tok: KimiTokenizer) -> None:
    ids = emit(tok, "ok 世")[:-1]
    out = check_splits(tok, ids, finish_reason="length")
    assert out.content == tok.decode(ids) == "ok \ufffd"


# -- lifecycle and the standalone parts -----------------------------------------------------------------


def test_lifecycle_errors(tok: KimiTokenizer) -> None:
    stream = KimiOutputStream(tok)
    with pytest.raises(TokenIdError):
        stream.push([tok.vocab_size])
    with pytest.raises(TokenIdError):
        stream.push(-1)
    stream.finish("stop")
    assert stream.finished and stream.finish_reason == "stop"
    with pytest.raises(RuntimeError):
        stream.push([1])
    with pytest.raises(RuntimeError):
        stream.finish("stop")
    with pytest.raises(ValueError):
        ToolCallParser(tok, first_index=-1)


def test_reasoning_parser_alone_passes_the_section_marker_on(tok: KimiTokenizer) -> None:
    parser = ReasoningParser(tok)
    assert not parser.in_reasoning
    text, rest = parser.push(emit(tok, THINK_BEGIN, "abc", SB, "x"))
    assert (text, rest) == ("abc", emit(tok, SB, "x"))
    assert not parser.in_reasoning and parser.finish() == ""
    assert ReasoningParser(tok, start_in_reasoning=True).in_reasoning
    assert not ReasoningParser(tok, enabled=False, start_in_reasoning=True).in_reasoning


def test_tool_call_parser_alone(tok: KimiTokenizer) -> None:
    parser = ToolCallParser(tok, first_index=5)
    deltas = parser.push(emit(tok, "hi", SB, CB, "functions.f:0", AB, "{}", CE, SE))
    assert deltas == [ContentDelta("hi"), ToolCallStart(0, "functions.f:5", "f"), ToolCallArguments(0, "{}")]
    assert parser.finish() == [] and parser.has_complete_call


# -- ids ---------------------------------------------------------------------------------------------


def test_tool_call_id_helpers() -> None:
    assert tool_call_id("get_weather", 3) == "functions.get_weather:3"
    assert parse_tool_call_id("functions.get_weather:3") == ("get_weather", 3)
    assert parse_tool_call_id(tool_call_id("ns.a-b", 12)) == ("ns.a-b", 12)
    bad = ("call_abc123", "toolu_01A", "functions.f", "functions.:1", "functions.f:x", "f:1", "functions.a:b:1", "")
    for client_id in (*bad, "functions.a b:1", "functions.f:1 "):
        assert parse_tool_call_id(client_id) is None
    with pytest.raises(ValueError):
        tool_call_id("", 0)
    with pytest.raises(ValueError):
        tool_call_id("f", -1)
    assert name_from_model_id(" functions.f:0 ") == "f"
    assert name_from_model_id("functions.get_wea", terminated=False) is None
    assert name_from_model_id("functions.get_weather", terminated=True) == "get_weather"
    assert name_from_model_id("7") is None


def test_count_history_tool_calls() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "functions.a:0"}, {"id": "functions.b:1"}]},
        {"role": "tool", "tool_call_id": "functions.a:0", "content": "1"},
        {"role": "assistant", "content": "x", "tool_calls": None},
        {"role": "assistant", "tool_calls": [{"id": "call_xyz"}]},
        {"role": "user", "content": "again", "tool_calls": [{"id": "ignored"}]},
    ]
    assert count_history_tool_calls(messages) == 3
    assert count_history_tool_calls([]) == 0
