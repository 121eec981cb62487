"""The agentic dataset: synthetic multi-turn tool-using sessions whose prompts grow every round.

Lifecycle: ``agentic_sessions(...)`` builds frozen ``AgenticSession`` plans once per sweep point
(seeded); the runner makes one fresh ``AgenticConversation`` per session and drives it round by
round: ``request(turn)`` -> send -> ``on_reply(turn, record)`` -> ``request(turn + 1)``, so a round
starts only after the previous round of the same session finished, as in a real agent loop.

Shape of a session (what a coding agent sends): every session shares one system prompt and one
set of OpenAI ``tools`` (JSON schemas) -- a long common prefix; round 0 is the user's task; after
each round the model's real reply is appended as the assistant message (reasoning kept: an
assistant turn with tool calls is the current agentic turn, which the Kimi template renders in
full) with the model's tool calls, or one synthetic call when it wrote none, then one ``tool``
message per call carrying a synthetic JSON result. So round k+1's messages start with all of round
k's messages, and the server's prefix cache can serve everything but the newest messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from k2serve.loadtest.bench_request import BenchRequest, Message, RequestRecord, Tool
from k2serve.loadtest.prompt_words import WordSource

SYSTEM_HEAD = "You are a coding agent working in a software repository. Use the tools to complete the task."
TOOL_CATALOGUE: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("read_file", "Read a file of the repository", {"path": "string", "start_line": "integer"}),
    ("run_command", "Run a shell command in the repository", {"command": "string", "timeout_s": "integer"}),
    ("search_code", "Search the repository for a pattern", {"query": "string", "glob": "string"}),
    ("write_file", "Write a file of the repository", {"path": "string", "content": "string"}),
)


def agent_tools(num_tools: int) -> tuple[Tool, ...]:
    """The first ``num_tools`` (1..4) tools of the catalogue, as OpenAI function tools."""
    if not 1 <= num_tools <= len(TOOL_CATALOGUE):
        raise ValueError(f"--agentic-num-tools must be in 1..{len(TOOL_CATALOGUE)}, got {num_tools}")
    tools = []
    for name, description, fields in TOOL_CATALOGUE[:num_tools]:
        properties = {key: {"type": kind} for key, kind in fields.items()}
        schema = {"type": "object", "properties": properties, "required": list(fields)[:1]}
        tools.append({"type": "function", "function": {"name": name, "description": description, "parameters": schema}})
    return tuple(tools)


@dataclass(frozen=True)
class AgenticSession:
    """The plan of one session: everything but the model's replies."""

    session_id: str
    system: str
    tools: tuple[Tool, ...]
    task: str
    tool_results: tuple[str, ...]  # the result text after round k, for k < rounds - 1
    max_tokens: int

    @property
    def num_turns(self) -> int:
        return len(self.tool_results) + 1


def agentic_sessions(
    *,
    num_sessions: int,
    num_rounds: int,
    tool_result_len: int,
    system_len: int,
    num_tools: int,
    output_len: int,
    seed: int,
) -> tuple[AgenticSession, ...]:
    if num_sessions < 1 or num_rounds < 1:
        raise ValueError("--agentic-sessions and --agentic-rounds must be at least 1")
    words = WordSource(seed)
    system = f"{SYSTEM_HEAD} {words.words(system_len)}".strip()  # shared by every session
    tools = agent_tools(num_tools)
    sessions = []
    for i in range(num_sessions):
        task = f"Task {i}: fix the failing test about {words.words(12)}"
        results = []
        for k in range(num_rounds - 1):
            name = tools[k % len(tools)]["function"]["name"]
            result = {"tool": name, "status": "ok", "exit_code": 0, "output": words.words(tool_result_len)}
            results.append(json.dumps(result))
        sessions.append(AgenticSession(f"agent-{seed}-{i}", system, tools, task, tuple(results), output_len))
    return tuple(sessions)


class AgenticConversation:
    """One running session: the message history, grown by each reply (mutable, one per run)."""

    def __init__(self, session: AgenticSession) -> None:
        self.session = session
        self.num_turns = session.num_turns
        self.session_id: str | None = session.session_id
        self.messages: list[Message] = [
            {"role": "system", "content": session.system},
            {"role": "user", "content": session.task},
        ]
        self._next_turn = 0
        self._num_calls = 0

    def request(self, turn: int) -> BenchRequest:
        if turn != self._next_turn:
            raise ValueError(f"session {self.session.session_id}: round {turn} asked before round {self._next_turn}")
        words = sum(len(str(m.get("content") or "").split()) for m in self.messages)
        return BenchRequest(
            messages=tuple(dict(m) for m in self.messages),
            max_tokens=self.session.max_tokens,
            session_id=self.session.session_id,
            turn=turn,
            prompt_len=words,
            tools=self.session.tools,
        )

    def on_reply(self, turn: int, record: RequestRecord) -> None:
        """Append the assistant's reply and, unless this was the last round, the tool results."""
        calls = [_call(c.id, c.name, c.arguments) for c in record.tool_calls if c.id and c.name]
        if not calls:  # the model wrote no call: the agent acts as if it had called the round's tool
            name = self.session.tools[turn % len(self.session.tools)]["function"]["name"]
            calls = [_call(f"functions.{name}:{self._num_calls}", name, json.dumps({"path": f"src/module_{turn}.py"}))]
        self._num_calls += len(calls)
        self.messages.append(
            {
                "role": "assistant",
                "content": _clean(record.text),
                "reasoning_content": _clean(record.reasoning),
                "tool_calls": calls,
            }
        )
        if turn < len(self.session.tool_results):
            for call in calls:
                self.messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": self.session.tool_results[turn]}
                )
        self._next_turn = turn + 1


def _call(id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _clean(text: str) -> str:
    """Generated text goes back into a request: servers reject NUL characters."""
    return text.replace("\x00", "")
