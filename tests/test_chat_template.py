"""The Kimi K2 Thinking chat template: the reference renders byte for byte, aliases, content, validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from k2serve.router.chat_template import (
    ChatInputError,
    ChatTemplate,
    ChatTemplateError,
    shipped_template_text,
)

DEFAULT_SYSTEM = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _weather_call(arguments: Any = '{"city": "Paris"}') -> dict[str, Any]:
    return {
        "id": "functions.get_weather:0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.shipped()


# -- the three literal renders of reference §5 ---------------------------------------------------


def test_example_1_user_only_with_generation_prompt(template: ChatTemplate) -> None:
    expected = (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    assert template.render([{"role": "user", "content": "Hi"}]) == expected


def test_example_2_tools_reasoning_tool_call_and_result(template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "You are Kimi."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [_weather_call()]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": '{"temp_c": 18}'},
    ]
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"Get weather","name":"get_weather",'
        '"parameters":{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}},'
        '"type":"function"}]<|im_end|><|im_system|>system<|im_middle|>You are Kimi.<|im_end|>'
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|>"
        "<think>Need the tool.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
        '{"temp_c": 18}<|im_end|><|im_assistant|>assistant<|im_middle|>'
    )
    assert template.render(messages, tools=[WEATHER_TOOL]) == expected


def test_example_3_finished_turn_loses_its_reasoning(template: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Simple arithmetic."},
        {"role": "user", "content": "and 3+3?"},
    ]
    expected = (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>2+2?<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>4"
        "<|im_end|><|im_user|>user<|im_middle|>and 3+3?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    assert template.render(messages) == expected


# -- behaviour beyond the examples -----------------------------------------------------------


def test_reasoning_alias_renders_like_reasoning_content(template: ChatTemplate) -> None:
    def turn(key: str) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, key: "Need the tool.", "tool_calls": [_weather_call()]},
        ]

    rendered = template.render(turn("reasoning"), add_generation_prompt=False)
    assert rendered == template.render(turn("reasoning_content"), add_generation_prompt=False)
    assert "<think>Need the tool.</think><|tool_calls_section_begin|>" in rendered


def test_agentic_turn_keeps_reasoning_while_history_drops_it(template: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning": "old thought"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "", "reasoning": "step 1", "tool_calls": [_weather_call()]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18"},
        {"role": "assistant", "content": "", "reasoning": "step 2", "tool_calls": [_weather_call({"city": "Zürich"})]},
    ]
    rendered = template.render(messages)
    assert "old thought" not in rendered
    assert "<think></think>a1<|im_end|>" in rendered
    assert "<think>step 1</think>" in rendered and "<think>step 2</think>" in rendered
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n18<|im_end|>" in rendered
    assert '<|tool_call_argument_begin|>{"city": "Zürich"}<|tool_call_end|>' in rendered  # dict args: tojson


def test_content_lists_concatenate_text_and_render_images_as_media_tokens(template: ChatTemplate) -> None:
    content = [
        {"type": "text", "text": "Look at "},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "this."},
    ]
    rendered = template.render([{"role": "user", "content": content}], add_generation_prompt=False)
    media = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n"
    assert rendered == f"{DEFAULT_SYSTEM}<|im_user|>user<|im_middle|>Look at {media}this.<|im_end|>"


def test_names_replace_role_labels_and_generation_prompt_is_optional(template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "name": "alice", "content": "hi"},
        {"role": "assistant", "name": "kimi", "content": "hello"},
    ]
    assert template.render(messages, add_generation_prompt=False) == (
        "<|im_system|>system<|im_middle|>S<|im_end|><|im_user|>alice<|im_middle|>hi<|im_end|>"
        "<|im_assistant|>kimi<|im_middle|><think></think>hello<|im_end|>"
    )


def test_tools_are_deep_sorted_without_touching_the_callers_objects(template: ChatTemplate) -> None:
    tools = [{"type": "function", "function": {"parameters": {"b": 1, "a": {"d": "é", "c": [{"z": 0, "y": 1}]}}}}]
    original = copy.deepcopy(tools)
    rendered = template.render([{"role": "user", "content": "x"}], tools=tools)
    assert rendered.startswith(
        '<|im_system|>tool_declare<|im_middle|>[{"function":{"parameters":{"a":{"c":[{"y":1,"z":0}],"d":"é"},"b":1}},'
        '"type":"function"}]<|im_end|>'
    )
    assert tools == original
    assert list(tools[0]) == ["type", "function"]


def test_messages_are_not_mutated_by_the_reasoning_alias(template: ChatTemplate) -> None:
    message = {"role": "assistant", "content": "a", "reasoning": "r"}
    template.render([{"role": "user", "content": "q"}, message])
    assert message == {"role": "assistant", "content": "a", "reasoning": "r"}


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "field", "index"),
    [
        ([{"content": "no role"}], "messages[0].role", 0),
        ([{"role": "user", "content": "ok"}, {"role": "developer", "content": "x"}], "messages[1].role", 1),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "messages[1].tool_call_id", 1),
        ([{"role": "user", "content": [{"type": "audio", "data": "..."}]}], "messages[0].content[0].type", 0),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", 0),
        ([{"role": "user", "content": 5}], "messages[0].content", 0),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
            ],
            "messages[1].tool_calls[0].id",
            1,
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "functions.f:0"}]}],
            "messages[1].tool_calls[0].function",
            1,
        ),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": 3}], "messages[1].reasoning", 1),
        (["just a string"], "messages[0]", 0),
    ],
)
def test_invalid_messages_raise_a_typed_error_naming_index_and_field(
    template: ChatTemplate, messages: list[Any], field: str, index: int
) -> None:
    with pytest.raises(ChatInputError) as excinfo:
        template.render(messages)
    assert excinfo.value.field == field
    assert excinfo.value.index == index
    assert str(excinfo.value).startswith(f"{field}: ")


def test_empty_messages_and_bad_tools_are_rejected(template: ChatTemplate) -> None:
    with pytest.raises(ChatInputError, match="at least one message"):
        template.render([])
    with pytest.raises(ChatInputError, match=r"tools\[1\]: must be an object"):
        template.render([{"role": "user", "content": "q"}], tools=[WEATHER_TOOL, "get_weather"])


# -- loading -----------------------------------------------------------------------------------


def test_model_folder_template_wins_over_the_shipped_one(tmp_path: Path) -> None:
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "Hi"}]).startswith(DEFAULT_SYSTEM)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}{{ tools | tojson(indent=1) }}"
    )
    custom = ChatTemplate.from_model_dir(tmp_path)
    assert custom.origin == str(tmp_path / "chat_template.jinja")
    assert custom.render([{"role": "user", "content": "<b>é</b>"}], tools=[{"b": 1, "a": 2}]) == (
        '[user:<b>é</b>][\n {\n  "a": 2,\n  "b": 1\n }\n]'
    )


def test_shipped_template_loads_as_package_data() -> None:
    text = shipped_template_text()
    assert "tool_declare" in text and "## Return of" in text


def test_template_errors_are_typed(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system prompt allowed') }}")
    with pytest.raises(ChatTemplateError, match="no system prompt allowed"):
        ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "q"}])
    (tmp_path / "chat_template.jinja").write_text("line one\n{% if %}")
    with pytest.raises(ChatTemplateError, match=r"chat_template.jinja:2: template syntax error"):
        ChatTemplate.from_model_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages.append(1) }}")  # the sandbox is immutable
    with pytest.raises(ChatTemplateError, match="rendering failed"):
        ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "q"}])
