"""The M3 chat format: message validation and the one chat renderer, shared by the Python API and the server.

`ChatTemplate` renders validated messages with the checkpoint's `chat_template.jinja` (jinja2, as transformers
does) when the file is present, otherwise with the built-in M3 layout (M3_SPEC.md §4.7):

    ]~!b[]~b]system\\n{thinking instructions}[e~[\\n
    ]~b]developer\\n{system messages}{tool definitions}[e~[\\n
    ]~b]user\\n{text}[e~[\\n
    ]~b]ai\\n</mm:think>{answer}{tool calls}[e~[\\n          (history turns keep no reasoning)
    ]~b]tool\\n<response>{result}</response>[e~[\\n
    ]~b]ai\\n + "<mm:think>" (thinking_mode "enabled") | "</mm:think>" ("disabled") | "" ("adaptive", default)

`M3Tokenizer.apply_chat_template` (the scheduler's and the vision prompt's chat path, so `m3jax.generate(...,
chat=True)`) and `/v1/chat/completions` both validate with `check_messages` / `check_tools` and render with the
tokenizer's ChatTemplate, so one conversation gives one prompt on both paths.

Messages are OpenAI chat messages. Validation raises `FieldError` (a ValueError) naming the bad field
(`messages[1].content[0].image_url`); the server answers 400 with that field, the Python API a ValueError naming
the request and the field. A user message's `image_url` parts become the image marker `]<]image[>[` in its text,
in place, and are handed back as `ImagePart`s in prompt order; the caller decodes them and expands the rendered
markers (m3jax.vision.prompt). Assistant tool calls are rendered in M3's namespaced tool-call text
(`render_tool_call`), the inverse of the server's parser (m3jax.serve.parsing).
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from typing import Any, Sequence

# M3 special tokens of the layout (the MiniMaxAI/MiniMax-M3 release's tokenizer.json; M3_SPEC.md §4.7).
BOS, ROLE, EOT = "]~!b[", "]~b]", "[e~["
THINK_START, THINK_END = "<mm:think>", "</mm:think>"
NS = "]<]minimax[>["                                   # the tool-call namespace token before every tag
TOOL_CALL_START, TOOL_CALL_END = NS + "<tool_call>", NS + "</tool_call>"
INVOKE_END = NS + "</invoke>"

THINKING_MODES = ("enabled", "disabled", "adaptive")
ROLES = ("system", "developer", "user", "assistant", "tool")
_MODE_TEXT = {
    "enabled": "Thinking is enabled: reason step by step inside <mm:think></mm:think> before every answer, "
               "tool results included.",
    "disabled": "Thinking is disabled: answer directly after the </mm:think> prefix, without reasoning.",
    "adaptive": "Thinking is adaptive: reason inside <mm:think></mm:think> when the turn needs it (planning, "
                "multi-step problems, tool results); otherwise answer directly after </mm:think>.",
}


class FieldError(ValueError):
    """A bad value in one request field; `field` names it (e.g. messages[1].content[0].image_url)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


@dataclasses.dataclass(frozen=True)
class ImagePart:
    """An image_url content part: where it is in the request and its URL (not yet decoded)."""

    field: str                 # e.g. "messages[1].content[0].image_url"
    url: str


_DETAILS = (None, "auto", "low", "high")      # accepted; the checkpoint's processor sets the resolution


def _image_part(part: dict, where: str) -> ImagePart:
    field = f"{where}.image_url"
    ref = part.get("image_url")
    if isinstance(ref, str):                  # some clients send the URL itself
        ref = {"url": ref}
    if not isinstance(ref, dict) or not isinstance(ref.get("url"), str) or not ref["url"]:
        raise FieldError(field, "must be an object {'url': 'data:image/...;base64,...'}")
    if ref.get("detail") not in _DETAILS:
        raise FieldError(f"{field}.detail", f"must be one of 'auto', 'low', 'high', got {ref['detail']!r:.40}")
    return ImagePart(field, ref["url"])


def _text(content, where: str, images: list[ImagePart] | None) -> str:
    """A message's content as text: a string, or a list of text parts and (when `images` is a list, where they
    go) image_url parts, each replaced by the image marker."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "image_url" and images is not None:
                # at call time: m3jax.vision's package imports this module (through vision.prompt)
                from m3jax.vision.processor import IMAGE_TOKEN

                images.append(_image_part(p, f"{where}[{j}]"))
                parts.append(IMAGE_TOKEN)
                continue
            if kind != "text" or not isinstance(p.get("text"), str):
                allowed = "{'type': 'text', 'text': str}" + (" or an image_url part" if images is not None else
                                                             " part (images go in user messages)")
                raise FieldError(f"{where}[{j}]", f"must be a {allowed}, got {p!r:.80}")
            parts.append(p["text"])
        return "".join(parts)
    raise FieldError(where, f"must be a string or a list of content parts, got {type(content).__name__}")


def check_messages(messages, images: list[ImagePart] | None = None) -> list[dict]:
    """Validated copies of OpenAI chat messages (content flattened to text). FieldError names the field.
    images: a list to receive the image_url parts of user messages (their markers stay in the text, in order);
    None refuses image parts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise FieldError("messages", "must be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError(where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise FieldError(f"{where}.role", f"must be one of {list(ROLES)}, got {role!r:.40}")
        msg = {"role": role, "content": _text(m.get("content"), f"{where}.content",
                                              images if role == "user" else None)}
        if role == "assistant":
            if isinstance(m.get("reasoning_content"), str):
                msg["reasoning_content"] = m["reasoning_content"]
            calls = m.get("tool_calls")
            if calls is not None:
                msg["tool_calls"] = _check_tool_calls(calls, f"{where}.tool_calls")
        elif m.get("content") is None:
            raise FieldError(f"{where}.content", f"is required for role {role!r}")
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = str(m["tool_call_id"])
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _check_tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise FieldError(where, "must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FieldError(f"{where}[{j}].function.name", "must be a string")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise FieldError(f"{where}[{j}].function.arguments", "must be a JSON object string") from None
        if not isinstance(args, dict):
            raise FieldError(f"{where}[{j}].function.arguments", "must be a JSON object")
        out.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def check_tools(tools) -> list[dict] | None:
    """Validated OpenAI tool definitions ([{"type": "function", "function": {"name", ...}}]) or None (none given,
    or an empty list). FieldError names the field."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise FieldError("tools", "must be a list of {'type': 'function', 'function': {...}} objects")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise FieldError(f"tools[{i}].type", "must be 'function'")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise FieldError(f"tools[{i}].function.name", "must be a non-empty string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise FieldError(f"tools[{i}].function.parameters", "must be a JSON schema object")
    return list(tools) or None


def template_arguments(chat) -> dict | None:
    """The `chat` argument of m3jax.generate / Engine.prepare / Engine.add_request as keyword arguments of
    M3Tokenizer.apply_chat_template: False or None -> None (no template), True -> {} (the template's defaults),
    a dict -> itself (e.g. {"tools": [...], "thinking_mode": "enabled"}: tools and chat_template_kwargs)."""
    if chat is None or chat is False:
        return None
    if chat is True:
        return {}
    if isinstance(chat, dict) and all(isinstance(k, str) for k in chat):
        clash = sorted({"messages", "images"} & set(chat))
        if clash:
            raise ValueError(f"chat: {clash[0]!r} is not a template argument (image_url parts go in the messages)")
        return dict(chat)
    raise ValueError(f"chat must be True, False or a dict of chat template arguments (tools, thinking_mode, ...), "
                     f"got {chat!r:.60}")


# ---------------------------------------------------------------------------------------------- tool calls
def render_tool_call(name: str, arguments: dict) -> str:
    """The M3 text of one call (the inverse of m3jax.serve.parsing.parse_invoke): what an assistant history turn
    contains. String values are raw text, objects nested elements, arrays <item> elements, others JSON."""
    return f'{NS}<invoke name="{name}">\n' + "".join(_render_element(k, v) for k, v in arguments.items()) \
        + INVOKE_END + "\n"


def _render_element(tag: str, value: Any) -> str:
    if isinstance(value, dict):
        inner = "\n" + "".join(_render_element(k, v) for k, v in value.items())
    elif isinstance(value, list):
        inner = "\n" + "".join(_render_element("item", v) for v in value)
    elif isinstance(value, str):
        inner = value
    else:
        inner = json.dumps(value, ensure_ascii=False)
    return f"{NS}<{tag}>{inner}{NS}</{tag}>\n"


# ---------------------------------------------------------------------------------------------- built-in layout
def _tools_text(tools: list[dict]) -> str:
    lines = ["", "", "# Tools", "You may call the functions below. Their JSON-schema definitions:", "<tools>"]
    lines += [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    lines += ["</tools>", "",
              "To call functions, end your answer with one block; each parameter is an element named after it "
              "(objects as nested elements, arrays as <item> elements, other non-string values as JSON):",
              TOOL_CALL_START, f'{NS}<invoke name="FUNCTION">', f"{NS}<PARAMETER>value{NS}</PARAMETER>",
              INVOKE_END, TOOL_CALL_END]
    return "\n".join(lines)


def _check_mode(thinking_mode) -> None:
    if thinking_mode not in THINKING_MODES:
        raise FieldError("thinking_mode", f"must be one of {list(THINKING_MODES)}, got {thinking_mode!r:.40}")


def render_builtin(messages: Sequence[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                   thinking_mode: str = "adaptive") -> str:
    """The built-in M3 layout of validated messages (see the module docstring)."""
    _check_mode(thinking_mode)
    system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    parts = [f"{BOS}{ROLE}system\n<thinking_instructions>\n{_MODE_TEXT[thinking_mode]}\n"
             f"</thinking_instructions>{EOT}\n",
             f"{ROLE}developer\n{system or 'You are a helpful assistant.'}{_tools_text(tools) if tools else ''}"
             f"{EOT}\n"]
    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            continue
        if role == "assistant":
            body = THINK_END + m["content"]
            if m.get("tool_calls"):
                body += ("\n" if m["content"] else "") + TOOL_CALL_START + "\n" + "".join(
                    render_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]
                ) + TOOL_CALL_END
            parts.append(f"{ROLE}ai\n{body}{EOT}\n")
        elif role == "tool":
            parts.append(f"{ROLE}tool\n<response>{m['content']}</response>{EOT}\n")
        else:
            parts.append(f"{ROLE}user\n{m['content']}{EOT}\n")
    if add_generation_prompt:
        parts.append(f"{ROLE}ai\n" + {"enabled": THINK_START, "disabled": THINK_END, "adaptive": ""}[thinking_mode])
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- jinja template
def _jinja_env():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must not contain
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclasses.dataclass
class ChatTemplate:
    """Renders chat prompts; `source` says which path runs ("chat_template.jinja" or "built-in M3 layout").
    The one renderer of m3jax: M3Tokenizer.apply_chat_template and the server both render through it."""

    jinja_source: str | None = None
    special_tokens: dict = dataclasses.field(default_factory=dict)
    origin: str = "chat_template.jinja"       # where jinja_source came from, for errors

    def __post_init__(self):
        self._compiled = None
        if self.jinja_source is not None:
            import jinja2
            try:
                self._compiled = _jinja_env().from_string(self.jinja_source)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise ValueError(f"{self.origin}: line {e.lineno}: {e.message}") from None

    @property
    def source(self) -> str:
        return "chat_template.jinja" if self.jinja_source is not None else "built-in M3 layout"

    @classmethod
    def from_checkpoint(cls, path: str | None) -> "ChatTemplate":
        """The checkpoint directory's chat_template.jinja (with the bos/eos/pad/unk strings of its
        tokenizer_config.json), or the built-in M3 layout without one (or for path None)."""
        file = None if path is None else os.path.join(path, "chat_template.jinja")
        if file is None or not os.path.exists(file):
            return cls()
        with open(file, encoding="utf-8") as f:
            source = f.read()
        specials = {"bos_token": BOS, "eos_token": EOT}
        cfg = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg):
            with open(cfg, encoding="utf-8") as f:
                tc = json.load(f)
            for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
                v = tc.get(k)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    specials[k] = v
        return cls(source, specials, file)

    def render(self, messages: Sequence[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               /, **kwargs: Any) -> str:
        """The prompt text of messages validated by `check_messages` (and tools by `check_tools`). kwargs are the
        template's variables (the server's `chat_template_kwargs`): thinking_mode (enabled | disabled | adaptive,
        default adaptive) for both paths; a jinja template may take others. FieldError names a bad kwarg by its
        name, or "messages" when a jinja template refuses the conversation (its raise_exception)."""
        clash = sorted({"messages", "tools", "add_generation_prompt"} & set(kwargs))
        if clash:
            raise FieldError(clash[0], "is an argument of the request, not a template variable")
        _check_mode(kwargs.get("thinking_mode", "adaptive"))
        if self._compiled is None:
            unknown = sorted(set(kwargs) - {"thinking_mode"})
            if unknown:
                raise FieldError(unknown[0], f"the built-in M3 layout takes only thinking_mode, got {unknown}")
            return render_builtin(messages, tools, add_generation_prompt, kwargs.get("thinking_mode", "adaptive"))
        import jinja2
        msgs = [dict(m, tool_calls=[{**c, "function": {**c["function"]}} for c in m["tool_calls"]])
                if m.get("tool_calls") else dict(m) for m in messages]
        try:
            return self._compiled.render(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as e:
            raise FieldError("messages", f"the chat template ({self.source}) refused them: {e}") from None


__all__ = ["BOS", "EOT", "ROLE", "NS", "THINK_START", "THINK_END", "TOOL_CALL_START", "TOOL_CALL_END", "INVOKE_END",
           "THINKING_MODES", "ChatTemplate", "FieldError", "ImagePart", "check_messages", "check_tools",
           "render_builtin", "render_tool_call", "template_arguments"]
