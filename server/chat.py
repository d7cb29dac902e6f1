"""Chat messages to a prompt: the checkpoint's chat templates, rendered as transformers renders them.

The templates are the tokenizer's (``engine.tokenizer`` finds them: ``chat_template.jinja`` or
``tokenizer_config.json``'s ``chat_template``, a string or named templates). A template is rendered
in a sandbox with transformers' variables: ``messages``, ``add_generation_prompt``, ``tools``,
``documents``, the named special tokens (``bos_token``, ``eos_token``, ...) and a request's
``chat_template_kwargs`` (``enable_thinking``, ...); and its helpers: ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, loop controls and the ``{% generation %}``
tag. Of named templates, ``tool_use`` is taken when tools are given and the checkpoint has it, else
``default``. The rendering is tokenized without adding special tokens (the template writes them),
and special tokens in it are matched whole. Without a template, the default below is used:

    {bos_token}<|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import CheckpointError, RequestError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "developer", "user", "assistant", "tool")
# the message keys passed to a template besides role and content (OpenAI's and vLLM's)
MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning", "thinking")
# a message's reasoning goes to templates under every name they read it by, as transformers does
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# variables a request may not set through chat_template_kwargs: the renderer sets them
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")


class ChatError(RequestError):
    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message, param)


class _TemplateRaised(Exception):
    """raise_exception() called by a template."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): its
    body renders as it is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _text(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ChatError(f"{where} must be a string or a list of {{'type': 'text', 'text': str}} parts")


def _tool_calls(calls, where: str) -> list[dict]:
    """OpenAI tool calls, with each function's ``arguments`` (a JSON string on the wire) parsed into
    the object that templates expect."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ChatError(f"{where} must be a list of objects")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatError(f"{where}[{j}].function must be an object with a 'name'")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ChatError(f"{where}[{j}].function.arguments is not valid JSON ({e})") from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def validate(messages) -> list[dict]:
    """Messages as templates see them: role, content as text, and the optional keys of
    ``MESSAGE_KEYS``; keys whose value is null are left out, as transformers does."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        message = {"role": role}
        content = m.get("content")
        if content is not None:
            message["content"] = _text(content, f"messages[{i}].content")
        elif not (role == "assistant" and m.get("tool_calls")):
            raise ChatError(f"messages[{i}].content is required (a string or a list of text parts)")
        for key in MESSAGE_KEYS:
            value = m.get(key)
            if value is None:
                continue
            if key == "tool_calls":
                value = _tool_calls(value, f"messages[{i}].tool_calls")
            elif not isinstance(value, str):
                raise ChatError(f"messages[{i}].{key} must be a string")
            message[key] = value
        reasoning = next((message[k] for k in REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ChatError("'tools' must be a list of objects", param="tools")
    for i, t in enumerate(tools):
        fn = t.get("function")
        if (
            t.get("type", "function") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
        ):
            raise ChatError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}", param="tools"
            )
    return tools


def _documents(documents) -> list[dict] | None:
    if documents is None:
        return None
    if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
        raise ChatError("'documents' must be a list of objects", param="documents")
    return documents


class ChatFormatter:
    """The tokenizer's chat templates, compiled once; ``prompt_ids`` renders and tokenizes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.source = tokenizer.settings.template_source or "the default chat template"
        sources = tokenizer.chat_templates or {"default": DEFAULT_TEMPLATE}
        env = _environment()
        self.templates: dict[str, jinja2.Template] = {}
        for name, text in sources.items():
            try:
                self.templates[name] = env.from_string(text)
            except jinja2.TemplateError as e:
                where = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
                raise CheckpointError(
                    f"{self.source}: chat template {name!r} does not parse ({where}{e})"
                ) from None
        self.variables = tokenizer.template_variables()

    def choose(self, tools) -> str:
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ChatError(
            f"{self.source}: the checkpoint has chat templates {sorted(self.templates)} and none is "
            "named 'default'"
        )

    def render(
        self,
        messages,
        add_generation_prompt: bool = True,
        tools=None,
        documents=None,
        template_kwargs: dict | None = None,
    ) -> str:
        messages = validate(messages)
        tools, documents = _tools(tools), _documents(documents)
        kwargs = template_kwargs or {}
        if not isinstance(kwargs, dict):
            raise ChatError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
        reserved = sorted(set(kwargs) & set(RESERVED))
        if reserved:
            raise ChatError(
                f"'chat_template_kwargs' may not set {', '.join(reserved)} (they are request fields)",
                param="chat_template_kwargs",
            )
        name = self.choose(tools)
        try:
            return self.templates[name].render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **{**self.variables, **kwargs},
            )
        except _TemplateRaised as e:
            raise ChatError(f"chat template {name!r} ({self.source}) refused the messages: {e}") from None
        except Exception as e:  # a template is a program of the checkpoint's: any failure is its own
            raise ChatError(
                f"chat template {name!r} ({self.source}) failed: {type(e).__name__}: {e}"
            ) from None

    def prompt_ids(self, messages, **render_kwargs) -> list[int]:
        return self.tokenizer.encode(self.render(messages, **render_kwargs), add_special_tokens=False)
