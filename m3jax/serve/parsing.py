"""Incremental parsing of M3 chat output: reasoning (`<mm:think>...</mm:think>`) and tool calls.

M3 writes its reasoning between `<mm:think>` and `</mm:think>`; a turn without reasoning starts with a bare
`</mm:think>` (written by the generation prompt when thinking is disabled, or by the model). Tool calls follow the
answer text, every tag prefixed by the namespace token `]<]minimax[>[` (M3_SPEC.md §4.7):

    ]<]minimax[>[<tool_call>
    ]<]minimax[>[<invoke name="get_weather">
    ]<]minimax[>[<city>Paris]<]minimax[>[</city>
    ]<]minimax[>[</invoke>
    ]<]minimax[>[</tool_call>

A parameter is named by its tag (a close tag without the namespace token is accepted too). Its value is raw text
for a string, nested elements for an object, `<item>` elements for an array, and JSON otherwise. `ChatOutputParser.feed(text)` takes the decoded text as it streams
and returns what became certain; text that may still be the start of a tag is held back until the next feed
or `finish()`. Feeding the whole text at once gives exactly the concatenation of the streamed deltas. The markers
and the rendering of calls into a prompt (`render_tool_call`, the inverse of `parse_invoke`) live with the chat
renderer in m3jax.chat.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from m3jax.chat import INVOKE_END, NS, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

_INVOKE_OPEN = re.compile(r'\s*' + re.escape(NS) + r'<invoke\s+name="([^"]*)"\s*>')


@dataclasses.dataclass
class ToolCall:
    """One parsed call: `arguments` is a JSON object string, as OpenAI's `function.arguments`."""

    index: int
    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self, with_index: bool = False) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if with_index:
            d["index"] = self.index
        return d


@dataclasses.dataclass
class ParsedDelta:
    """What one feed made certain: reasoning text, answer text, and completed tool calls."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: "ParsedDelta") -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def _partial_suffix(text: str, *tags: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (to hold back)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ReasoningParser:
    """Splits the text stream into reasoning and content.

    starts_in_reasoning: the prompt ended with `<mm:think>` (thinking_mode "enabled"), so the output begins
    inside the reasoning. Otherwise a leading `<mm:think>` opens reasoning and a leading bare `</mm:think>` is
    dropped (a turn without reasoning); anything else is content.
    """

    def __init__(self, starts_in_reasoning: bool = False):
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buf = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) made certain by `text`; final=True flushes what was held back."""
        self._buf += text
        reasoning = content = ""
        while True:
            if self._state == "start":
                head = self._buf.lstrip()
                if head.startswith(THINK_START):
                    self._buf, self._state = head[len(THINK_START):], "reasoning"
                elif head.startswith(THINK_END):
                    self._buf, self._state = head[len(THINK_END):], "content"
                elif not final and (THINK_START.startswith(head) or THINK_END.startswith(head)):
                    return reasoning, content                    # too short to decide
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                i = self._buf.find(THINK_END)
                if i >= 0:
                    reasoning += self._buf[:i]
                    self._buf, self._state = self._buf[i + len(THINK_END):], "content"
                    continue
                keep = 0 if final else _partial_suffix(self._buf, THINK_END)
                reasoning += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return reasoning, content
            else:
                content += self._buf
                self._buf = ""
                return reasoning, content


def _param_types(tools: list[dict] | None) -> dict[str, dict]:
    """{function name: its JSON-schema `parameters`} from OpenAI tool definitions."""
    out = {}
    for t in tools or ():
        fn = t.get("function", {}) if isinstance(t, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") or {}
    return out


_ELEMENT = re.compile(re.escape(NS) + r"<([^<>/\s]+)>")


def _elements(body: str) -> list[tuple[str, str]]:
    """[(tag, inner text)] of the top-level `NS<tag>...NS</tag>` elements of `body`, in order."""
    out, pos = [], 0
    while True:
        m = _ELEMENT.search(body, pos)
        if m is None:
            return out
        tag, start = m.group(1), m.end()
        close, opening = "</" + tag + ">", NS + "<" + tag + ">"
        depth, i = 1, start
        while depth:                                    # nested elements may reuse the tag (e.g. item)
            j = body.find(close, i)
            if j < 0:
                return out                              # unterminated: ignore the rest
            k = body.find(opening, i)
            if 0 <= k < j:
                depth, i = depth + 1, k + len(opening)
            else:
                depth, i = depth - 1, j + len(close)
        end = i - len(close)
        if body[:end].endswith(NS):                     # the close tag carries the namespace token (M3 writes
            end -= len(NS)                              # it; some outputs omit it, which is accepted too)
        out.append((tag, body[start:end]))
        pos = i


def _value(text: str, schema: dict | None) -> Any:
    """A parameter value as the schema types it (untyped: nested elements, else JSON, else the string)."""
    schema = schema if isinstance(schema, dict) else {}
    kind = schema.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if "string" in kinds:
        return text
    if "object" in kinds or (kind is None and _ELEMENT.match(text.strip())):
        if "object" in kinds or not text.strip().startswith(NS + "<item>"):
            props = schema.get("properties") or {}
            return {k: _value(v, props.get(k)) for k, v in _elements(text)}
    if "array" in kinds or (kind is None and text.strip().startswith(NS + "<item>")):
        return [_value(v, schema.get("items")) for tag, v in _elements(text) if tag == "item"]
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_invoke(block: str, param_types: dict[str, dict], index: int) -> ToolCall | None:
    """One `NS<invoke name="...">...NS</invoke>` block (closing tag excluded) -> ToolCall, or None."""
    m = _INVOKE_OPEN.match(block)
    if m is None:
        return None
    name = m.group(1).strip()
    schema = param_types.get(name, {})
    props = schema.get("properties") or {} if isinstance(schema, dict) else {}
    args = {k: _value(v, props.get(k)) for k, v in _elements(block[m.end():])}
    return ToolCall(index, name, json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Splits content into answer text and tool calls; each call is emitted once its `</invoke>` arrives."""

    def __init__(self, tools: list[dict] | None = None):
        self._types = _param_types(tools)
        self._state = "content"
        self._buf = ""
        self._count = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = "", []
        while True:
            if self._state == "content":
                i = self._buf.find(TOOL_CALL_START)
                if i >= 0:
                    content += self._buf[:i]
                    self._buf, self._state = self._buf[i + len(TOOL_CALL_START):], "calls"
                    continue
                keep = 0 if final else _partial_suffix(self._buf, TOOL_CALL_START)
                content += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return content, calls
            if self._state == "calls":
                end = self._buf.find(INVOKE_END)
                stop = self._buf.find(TOOL_CALL_END)
                if 0 <= stop and (end < 0 or stop < end):
                    self._buf, self._state = self._buf[stop + len(TOOL_CALL_END):], "content"
                    continue
                if end < 0:
                    if final:                                  # unterminated call: keep the text visible
                        content += TOOL_CALL_START + self._buf
                        self._buf = ""
                    return content, calls
                call = parse_invoke(self._buf[:end], self._types, self._count)
                if call is not None:
                    calls.append(call)
                    self._count += 1
                self._buf = self._buf[end + len(INVOKE_END):]


class ChatOutputParser:
    """Reasoning split, then tool-call parsing of the content. reasoning=False keeps `<mm:think>` in content."""

    def __init__(self, *, reasoning: bool = True, starts_in_reasoning: bool = False,
                 tools: list[dict] | None = None):
        self._reasoning = ReasoningParser(starts_in_reasoning) if reasoning else None
        self._tools = ToolCallParser(tools) if tools else None

    def feed(self, text: str, final: bool = False) -> ParsedDelta:
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text, final)
        else:
            reasoning, content = "", text
        if self._tools is None:
            return ParsedDelta(reasoning, content)
        content, calls = self._tools.feed(content, final)
        return ParsedDelta(reasoning, content, calls)

    def finish(self) -> ParsedDelta:
        return self.feed("", final=True)

    def parse(self, text: str) -> ParsedDelta:
        """The whole output at once (non-streaming)."""
        out = self.feed(text)
        out.extend(self.finish())
        return out


__all__ = ["ChatOutputParser", "ParsedDelta", "ReasoningParser", "ToolCall", "ToolCallParser", "parse_invoke"]
