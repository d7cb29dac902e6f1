"""The OpenAI API's requests, parsed and checked with no transport in them.

Each function takes a request body (a dict decoded from JSON) and returns what the engine needs:
prompts as token ids, ``SamplingParams`` (the checkpoint's generation_config.json defaults for
what a request leaves out), stops, log-probability counts, chat-template fields. Every refusal is
a ``ProtocolError`` (an ``engine.errors.RequestError``) that names the field; a front end maps it
to its status (HTTP 400 or 404, gRPC INVALID_ARGUMENT or NOT_FOUND).
"""

from __future__ import annotations

import json
import re

from engine.errors import RequestError
from engine.request import MAX_LOGPROBS, SamplingParams
from engine.structured import grammar_from


class ProtocolError(RequestError):
    """A request the API refuses. ``kind``: "invalid" (a malformed or out-of-range field) or
    "not_found" (a model this server does not have)."""

    def __init__(
        self, message: str, param: str | None = None, kind: str = "invalid", code: str | None = None
    ):
        super().__init__(message, param)
        self.kind, self.code = kind, code


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ProtocolError(
            f"model {model!r} does not exist (this server has {served!r})",
            param="model",
            kind="not_found",
            code="model_not_found",
        )


def field_value(body: dict, name: str, kinds, default, check=None, why=""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ProtocolError(f"'{name}' must be {why or kinds}", param=name)
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise ProtocolError(f"'{name}' must be {why}, got {value!r}", param=name)
    return value


def prompts(body: dict, tok) -> list[list[int]]:
    """A completions request's prompts as token ids (text through the tokenizer ``tok``)."""
    prompt = body.get("prompt")
    if prompt == "" or prompt == [] or prompt == [""]:
        raise ProtocolError("'prompt' is empty", param="prompt")
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tok.encode(p) for p in prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return [list(prompt)]
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt
        )
    ):
        return [list(p) for p in prompt]
    raise ProtocolError(
        "'prompt' must be a string, a list of strings, or token ids (a list or a list of lists)",
        param="prompt",
    )


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids",
                 "seed", "stream", "stream_options", "priority", "user", "presence_penalty", "ignore_eos",
                 "frequency_penalty", "repetition_penalty", "logprobs", "logit_bias",
                 "return_tokens_as_token_ids", "response_format", "structured_outputs"}  # fmt: skip
FIELDS = {
    "text_completion": COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"},
    "chat.completion": COMMON_FIELDS
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "documents",
        "chat_template_kwargs",
        "add_generation_prompt",
    },
}
# accepted only at the value that changes nothing
NEUTRAL = {"suffix": ("",), "logit_bias": ({},)}


def check_fields(body: dict, shape_object: str) -> None:
    for name in body:
        if name not in FIELDS[shape_object]:
            raise ProtocolError(f"unknown field {name!r}", param=name)
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise ProtocolError(f"{name!r} is not supported by this server yet", param=name)
    if body.get("best_of") is not None and body.get("best_of") != body.get("n", 1):
        raise ProtocolError("'best_of' other than n is not supported", param="best_of")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ProtocolError("'user' must be a string", param="user")


def logprobs_count(body: dict, chat: bool) -> int | None:
    """How many top log-probabilities each generated token comes with (None: no log-probabilities).
    Completions: ``logprobs`` is that number; chat: ``logprobs`` is a flag and ``top_logprobs`` the
    number."""
    if chat:
        wanted = field_value(body, "logprobs", bool, False, None, "a boolean")
        top = field_value(
            body,
            "top_logprobs",
            int,
            None,
            lambda v: 0 <= v <= MAX_LOGPROBS,
            f"an integer in [0, {MAX_LOGPROBS}]",
        )
        if top is not None and not wanted:
            raise ProtocolError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (top or 0) if wanted else None
    return field_value(
        body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]"
    )


# a stop string written like a special token: one the tokenizer lacks is a mistake, not text
SPECIAL_LOOKING = re.compile(r"<\|[^<>|\s]+\|>")


def stops(body: dict, tokenizer) -> tuple[list[str], list[int]]:
    """Stop strings and stop token ids; a stop string that is one special token of the tokenizer
    (``<|eot_id|>``, which decoding never writes as text) stops on that token's id instead."""
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ProtocolError("'stop' must be a string or a list of non-empty strings", param="stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (
        isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)
    ):
        raise ProtocolError("'stop_token_ids' must be a list of token ids", param="stop_token_ids")
    strings, ids = [], list(stop_ids or [])
    for s in stop or []:
        token_id = tokenizer.token_to_id(s) if tokenizer is not None else None
        if token_id is not None and token_id in tokenizer.special_ids:
            ids.append(token_id)
        elif SPECIAL_LOOKING.fullmatch(s) and tokenizer is not None and token_id is None:
            raise ProtocolError(
                f"'stop': {s!r} is not a special token of this model's tokenizer ({tokenizer.path})",
                param="stop",
            )
        else:
            strings.append(s)
    return strings, ids


def sampling(
    body: dict, chat: bool, tokenizer=None, defaults: dict | None = None
) -> tuple[SamplingParams, int]:
    """The request's sampling parameters; ``defaults`` (the checkpoint's generation_config.json)
    fill in the ones it leaves out."""
    stop, stop_ids = stops(body, tokenizer)
    defaults = defaults or {}
    number = (int, float)
    penalty = (number, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    params = SamplingParams(
        max_tokens=field_value(body, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1"),
        temperature=float(
            field_value(
                body,
                "temperature",
                number,
                defaults.get("temperature", 1.0),
                lambda v: 0 <= v <= 2,
                "a number in [0, 2]",
            )
        ),
        top_p=float(
            field_value(
                body, "top_p", number, defaults.get("top_p", 1.0), lambda v: 0 < v <= 1, "a number in (0, 1]"
            )
        ),
        top_k=field_value(
            body, "top_k", int, defaults.get("top_k", 0), lambda v: v >= -1, "an integer >= -1"
        ),
        seed=field_value(body, "seed", int, None, None, "an integer"),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=field_value(body, "ignore_eos", bool, False, None, "a boolean"),
        presence_penalty=float(field_value(body, "presence_penalty", *penalty)),
        frequency_penalty=float(field_value(body, "frequency_penalty", *penalty)),
        repetition_penalty=float(
            field_value(
                body,
                "repetition_penalty",
                number,
                defaults.get("repetition_penalty", 1.0),
                lambda v: 0 < v <= 2,
                "a number in (0, 2]",
            )
        ),
        logprobs=logprobs_count(body, chat),
    )
    n = field_value(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]")
    return params, n


# vLLM's structured_outputs: exactly one of these
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _schema(value, param: str) -> dict:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ProtocolError(f"{param} is not valid JSON ({e})", param=param) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{param} must be a JSON schema (an object)", param=param)
    return value


def _response_format(value) -> tuple[str, object, str] | None:
    """OpenAI's ``response_format``: (kind, value, field) of its constraint, None for text."""
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise ProtocolError(
            f"'response_format' must be an object whose 'type' is one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )
    kind = value["type"]
    extra = sorted(set(value) - {"type", kind})
    if extra:
        raise ProtocolError(f"unknown field response_format.{extra[0]}", param=f"response_format.{extra[0]}")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", None, "response_format"
    spec = value.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise ProtocolError(f"{where} must be an object with a 'schema'", param=where)
    for name in spec:
        if name not in ("name", "description", "schema", "strict"):
            raise ProtocolError(f"unknown field {where}.{name}", param=f"{where}.{name}")
    for name, kinds in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(name) is not None and not isinstance(spec[name], kinds):
            raise ProtocolError(f"{where}.{name} must be a {kinds.__name__}", param=f"{where}.{name}")
    if "schema" not in spec:
        raise ProtocolError(f"{where}.schema is required", param=f"{where}.schema")
    return "json", _schema(spec["schema"], f"{where}.schema"), f"{where}.schema"


def _structured_outputs(value) -> tuple[str, object, str]:
    """vLLM's ``structured_outputs``: (kind, value, field) of its one constraint."""
    if not isinstance(value, dict):
        raise ProtocolError("'structured_outputs' must be an object", param="structured_outputs")
    for name in value:
        if name not in STRUCTURED_KINDS:
            raise ProtocolError(
                f"structured_outputs.{name} is not supported (give one of {', '.join(STRUCTURED_KINDS)})",
                param=f"structured_outputs.{name}",
            )
    given = [k for k in STRUCTURED_KINDS if value.get(k) is not None]
    if len(given) != 1:
        raise ProtocolError(
            f"'structured_outputs' must give exactly one of {', '.join(STRUCTURED_KINDS)}, got "
            f"{', '.join(given) or 'none'}",
            param="structured_outputs",
        )
    kind = given[0]
    where, v = f"structured_outputs.{kind}", value[kind]
    if kind == "json":
        return kind, _schema(v, where), where
    if kind == "json_object":
        if v is not True:
            raise ProtocolError(f"{where} must be true", param=where)
        return kind, None, where
    if kind == "choice":
        if not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
            raise ProtocolError(f"{where} must be a non-empty list of non-empty strings", param=where)
        return kind, v, where
    if not (isinstance(v, str) and v):
        raise ProtocolError(f"{where} must be a non-empty string", param=where)
    return kind, v, where


def constraint(body: dict) -> tuple[str, str] | None:
    """The request's output constraint, from ``response_format`` (OpenAI's) or ``structured_outputs``
    (vLLM's), as (llguidance grammar, the field it came from); None when unconstrained. The grammar
    is still to be checked against the vocabulary (``StructuredOutputs.check``)."""
    found = []
    if body.get("response_format") is not None:
        spec = _response_format(body["response_format"])
        if spec is not None:
            found.append(spec)
    if body.get("structured_outputs") is not None:
        found.append(_structured_outputs(body["structured_outputs"]))
    if len(found) > 1:
        raise ProtocolError(
            "give one constraint: 'response_format' and 'structured_outputs' together contradict",
            param="structured_outputs",
        )
    if not found:
        return None
    kind, value, where = found[0]
    return grammar_from(kind, value, where), where


def template_fields(body: dict) -> dict:
    """What a chat request gives its template besides the messages (ChatFormatter.render's)."""
    return {
        "add_generation_prompt": field_value(body, "add_generation_prompt", bool, True, None, "a boolean"),
        "tools": body.get("tools"),
        "documents": body.get("documents"),
        "template_kwargs": body.get("chat_template_kwargs"),
    }


TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_generation_prompt", "add_special_tokens", "tools",
                   "documents", "chat_template_kwargs"}  # fmt: skip


def tokenize_request(body: dict, formatter) -> tuple[str, bool]:
    """``POST /tokenize``'s text and whether special tokens are added: ``{"prompt": str}`` (added
    unless ``add_special_tokens`` is false) or ``{"messages": [...], ...}`` rendered with the chat
    template (only those the template writes, unless ``add_special_tokens`` is true)."""
    for name in body:
        if name not in TOKENIZE_FIELDS:
            raise ProtocolError(f"unknown field {name!r}", param=name)
    chat = "messages" in body
    if chat == ("prompt" in body):
        raise ProtocolError("give either 'prompt' (a string) or 'messages'", param="prompt")
    special = field_value(body, "add_special_tokens", bool, not chat, None, "a boolean")
    if chat:
        return formatter.render(body["messages"], **template_fields(body)), special
    for name in ("add_generation_prompt", "tools", "documents", "chat_template_kwargs"):
        if name in body:
            raise ProtocolError(f"{name!r} goes with 'messages', not 'prompt'", param=name)
    if not isinstance(body["prompt"], str):
        raise ProtocolError("'prompt' must be a string", param="prompt")
    return body["prompt"], special


def detokenize_request(body: dict, vocab_size: int) -> list[int]:
    """``POST /detokenize``'s token ids."""
    for name in body:
        if name not in ("model", "tokens"):
            raise ProtocolError(f"unknown field {name!r}", param=name)
    tokens = body.get("tokens")
    if not (
        isinstance(tokens, list)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in tokens)
    ):
        raise ProtocolError(f"'tokens' must be a list of token ids in [0, {vocab_size})", param="tokens")
    return tokens
