"""Tool calling in chat completions: a request's tools and tool_choice, the grammar that enforces
``required`` and named choices, and the model's tool-call syntax parsed into OpenAI ``tool_calls``,
whole or as streamed deltas.

A parser knows one family's syntax (``PARSERS``; ``--tool-call-parser``, else the one whose
markers the chat template writes):

- ``hermes`` (Hermes, Qwen 2.5 / 3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, after any text;
- ``llama3_json`` (Llama 3.1+ JSON tool calls): the reply is ``{"name": ..., "parameters": {...}}``,
  several separated by ``;``.

A parser splits the text generated so far into the content (a prefix of the text: what comes
before the first call, without the blanks before it) and the JSON text of each call; each call's
JSON is read key by key with ``json``'s decoder, so that a call's name is known once its string is
complete and its arguments are the raw text of the arguments object, growing as it streams. The
streamed deltas are therefore pieces of exactly the text the whole answer has.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from engine.errors import RequestError
from engine.structured import lark_json

PARSERS = ("hermes", "llama3_json")
CHOICES = ("none", "auto", "required")
_decoder = json.JSONDecoder()


def _error(message: str, param: str) -> RequestError:
    return RequestError(message, param=param)


@dataclass
class RawCall:
    """One call as far as it has been generated."""

    name: str | None = None  # once its JSON string is complete
    arguments: str = ""  # the raw text of its arguments object so far (all of it once complete)


def read_call(text: str, argument_keys: tuple[str, ...]) -> RawCall:
    """The name and arguments of a call's JSON object ``text``, complete or cut short."""
    call = RawCall()
    text = text.lstrip()
    if not text.startswith("{"):
        return call
    pos = 1
    while True:
        pos = _skip(text, pos)
        if pos >= len(text) or text[pos] == "}":
            return call
        try:
            key, pos = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return call
        pos = _skip(text, pos)
        if pos >= len(text) or text[pos] != ":" or not isinstance(key, str):
            return call
        start = _skip(text, pos + 1)
        if start >= len(text):
            return call
        try:
            value, pos = _decoder.raw_decode(text, start)
        except json.JSONDecodeError:  # cut short: the rest of the text is the start of this value
            if key in argument_keys and text[start] == "{":
                call.arguments = text[start:]
            return call
        if key == "name" and isinstance(value, str):
            call.name = value
        elif key in argument_keys and isinstance(value, dict):
            call.arguments = text[start:pos]
        pos = _skip(text, pos)
        if pos >= len(text) or text[pos] != ",":
            return call
        pos += 1


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class ToolParser:
    """One family's tool-call syntax."""

    name: str
    argument_keys: tuple[str, ...]

    def split(self, text: str, final: bool) -> tuple[int, list[str]]:
        """(how much of ``text`` is content, the JSON text of each call so far). While not
        ``final``, the content stops short of anything that could still turn out to be a call."""
        raise NotImplementedError

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """A Lark grammar whose every sentence is one call (``parallel``: one or more) of one of
        ``tools``, with arguments that match the tool's parameter schema."""
        raise NotImplementedError

    def _call_schema(self, tool: dict) -> dict:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        return {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, self.argument_keys[0]: params},
            "required": ["name", self.argument_keys[0]],
            "additionalProperties": False,
        }

    def _json_rule(self, tools: list[dict]) -> str:
        schemas = [self._call_schema(t) for t in tools]
        return lark_json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


class HermesParser(ToolParser):
    name = "hermes"
    argument_keys = ("arguments", "parameters")
    START, END = "<tool_call>", "</tool_call>"

    def split(self, text, final):
        at = text.find(self.START)
        if at < 0:
            if final:
                return len(text), []
            end = len(text)
            for k in range(min(len(self.START) - 1, end), 0, -1):
                if text.endswith(self.START[:k]):
                    end -= k
                    break
            return len(text[:end].rstrip()), []
        calls = []
        while at >= 0:
            body = at + len(self.START)
            close = text.find(self.END, body)
            calls.append(text[body : close if close >= 0 else len(text)])
            at = text.find(self.START, close) if close >= 0 else -1
        return len(text[: text.find(self.START)].rstrip()), calls

    def grammar(self, tools, parallel):
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return f'{start}\ncall: "{self.START}\\n" body "\\n{self.END}"\nbody: {self._json_rule(tools)}\n'


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    argument_keys = ("parameters", "arguments")

    def split(self, text, final):
        s = text.lstrip()
        if not s:
            return (len(text) if final else 0), []
        if not s.startswith("{"):
            return len(text), []
        calls, pos = [], 0
        while pos < len(s) and s[pos] == "{":
            try:
                _, end = _decoder.raw_decode(s, pos)
            except json.JSONDecodeError:
                calls.append(s[pos:])
                break
            calls.append(s[pos:end])
            pos = _skip(s, end)
            if s[pos : pos + 1] != ";":
                break
            pos = _skip(s, pos + 1)
        return 0, calls

    def grammar(self, tools, parallel):
        start = 'start: body ("; " body)*' if parallel else "start: body"
        return f"{start}\nbody: {self._json_rule(tools)}\n"


_PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser())}


def parser_for(name: str | None, tokenizer) -> ToolParser:
    """The parser named (``PARSERS``), or the one whose syntax the chat template writes: Llama 3's
    when it has ``<|python_tag|>`` or asks for ``"parameters"``, else Hermes'."""
    if name is not None:
        return _PARSERS[name]
    source = "".join((tokenizer.chat_templates or {}).values()) if tokenizer is not None else ""
    if "<tool_call>" not in source and ("<|python_tag|>" in source or '"parameters"' in source):
        return _PARSERS["llama3_json"]
    return _PARSERS["hermes"]


@dataclass
class ToolRequest:
    """What a chat request asks of tools."""

    tools: list[dict]
    choice: str | dict  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel: bool
    parser: ToolParser

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    def forced(self) -> list[dict] | None:
        """The tools one of which must be called (``required``, a named function), or None."""
        if self.choice == "required":
            return self.tools
        if isinstance(self.choice, dict):
            return [t for t in self.tools if t["function"]["name"] == self.choice["function"]["name"]]
        return None

    def grammar(self) -> str | None:
        forced = self.forced()
        return None if forced is None else self.parser.grammar(forced, self.parallel)


def tool_request(body: dict, parser: ToolParser) -> ToolRequest | None:
    """A chat request's tools, tool_choice and parallel_tool_calls, checked; None without tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise _error("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none"):
            raise _error("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise _error("'tools' must be a non-empty list of functions", "tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not fn["name"]
        ):
            shape = "{'type': 'function', 'function': {'name': str, ...}}"
            raise _error(f"tools[{i}] must be {shape}", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _error(f"tools[{i}].function.parameters must be a JSON schema (an object)", "tools")
        if fn["name"] in names:
            raise _error(f"tools[{i}]: a second function named {fn['name']!r}", "tools")
        names.append(fn["name"])
    choice = "auto" if choice is None else choice
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise _error(
                f"'tool_choice' must be one of {', '.join(CHOICES)} or a named function", "tool_choice"
            )
    else:
        fn = choice.get("function") if isinstance(choice, dict) else None
        if not (
            isinstance(choice, dict)
            and choice.get("type") == "function"
            and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)
        ):
            raise _error(
                "'tool_choice' must be one of none, auto, required or "
                "{'type': 'function', 'function': {'name': str}}",
                "tool_choice",
            )
        if fn["name"] not in names:
            raise _error(f"'tool_choice' names {fn['name']!r}, which is not one of the tools", "tool_choice")
    return ToolRequest(tools, choice, parallel, parser)


@dataclass
class ToolOutput:
    """Reads one choice's text as the parser's calls, whole or as it streams."""

    request: ToolRequest
    text: str = ""
    content_sent: int = 0  # characters of the text handed out as content
    sent: list[list] = field(default_factory=list)  # per call started: [id, arguments sent]
    called: bool = False

    def _read(self, final: bool) -> tuple[int, list[RawCall]]:
        parser = self.request.parser
        content, bodies = parser.split(self.text, final)
        calls = [read_call(b, parser.argument_keys) for b in bodies]
        calls = [c for c in calls if c.name is not None]
        if final and not calls:  # nothing in it is a call after all: all of it is content
            content = len(self.text)
        return content, calls

    def message(self, text: str) -> tuple[str | None, list[dict]]:
        """The whole answer: its content (None when it is only calls) and its tool calls."""
        self.text = text
        content, calls = self._read(final=True)
        out = [_call(f"call_{uuid.uuid4().hex[:24]}", c.name, c.arguments) for c in calls]
        self.called = bool(out)
        return (text[:content] or None) if out else text, out

    def delta(self, text: str, final: bool) -> dict:
        """The next piece of a streamed answer: ``content`` and ``tool_calls`` deltas (OpenAI's:
        a call's first delta has its index, id, type and name, the rest pieces of its arguments)."""
        self.text += text
        content, calls = self._read(final)
        delta: dict = {}
        if not self.sent and content > self.content_sent:
            delta["content"] = self.text[self.content_sent : content]
            self.content_sent = content
        pieces = []
        for i, call in enumerate(calls):
            if i == len(self.sent):
                self.sent.append([f"call_{uuid.uuid4().hex[:24]}", 0])
                piece = _call(self.sent[i][0], call.name, "")
                piece["index"] = i
                pieces.append(piece)
            more = call.arguments[self.sent[i][1] :]
            if more:
                self.sent[i][1] = len(call.arguments)
                if pieces and pieces[-1]["index"] == i:
                    pieces[-1]["function"]["arguments"] += more
                else:
                    pieces.append({"index": i, "function": {"arguments": more}})
        if pieces:
            delta["tool_calls"] = pieces
            self.called = True
        return delta


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
