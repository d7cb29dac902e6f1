"""Tool calling in chat completions (server/tools.py) on random-weight Qwen2- and Llama 3-style
checkpoints: ``required`` and named tool choices always give calls whose arguments validate
against the function's schema, in the template family's syntax; streamed deltas concatenate to the
whole answer's calls; tool messages render through the template; bad tool requests are 400s."""

import json

import jsonschema
import openai
import pytest
from hf_models import write_hf_checkpoint
from servers import app_in_thread, post_json

from engine.generate import Generator
from engine.scheduler import Engine
from engine.tokenizer import load_tokenizer
from server.app import create_app
from server.state import ServerConfig
from server.testing.hf_tokenizers import write_llama3_tokenizer, write_qwen2_tokenizer
from server.tools import HermesParser, Llama3JsonParser, ToolOutput, ToolRequest, parser_for

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _serve(root, name, write_tokenizer):
    path = write_tokenizer(root / name)
    vocab = load_tokenizer(path).vocab_size + 4
    write_hf_checkpoint(name, path, seed=1, vocab_size=vocab, max_position_embeddings=2048)
    gen = Generator.from_pretrained(path)
    engine = Engine.for_model(gen.model, 1024, 16, gen.tokenizer, max_batched_tokens=1024)
    return app_in_thread(create_app(engine, ServerConfig(model_name=name)))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    with _serve(tmp_path_factory.mktemp("tools"), "qwen2", write_qwen2_tokenizer) as (base, _):
        yield base


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    with _serve(tmp_path_factory.mktemp("tools"), "llama", write_llama3_tokenizer) as (base, _):
        yield base


def _client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _check_calls(message, names, one=False, cut=False):
    """Every call names one of ``names`` and its arguments validate; ``cut``: the answer ran out of
    tokens, and its last call may be unfinished."""
    calls = message.tool_calls
    assert calls, message
    assert not one or len(calls) == 1
    for call in calls[:-1] if cut else calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_required_tool_choice_always_gives_calls_that_validate(family, request):
    client = _client(request.getfixturevalue(family))
    model = "qwen2" if family == "qwen" else "llama"
    for parallel in (True, False):
        for temperature in (0, 1):
            out = client.chat.completions.create(
                model=model,
                messages=MESSAGES,
                tools=TOOLS,
                tool_choice="required",
                parallel_tool_calls=parallel,
                temperature=temperature,
                seed=2,
                n=3,
                max_completion_tokens=400,
            )
            for choice in out.choices:
                # parallel calls go on while the model chooses another over the end, which an
                # untrained one may never do: those run out of tokens in their last call
                assert choice.finish_reason == "tool_calls" or (parallel and choice.finish_reason == "length")
                _check_calls(choice.message, SCHEMAS, one=not parallel, cut=choice.finish_reason == "length")


def test_a_named_tool_choice_calls_that_function(qwen):
    out = _client(qwen).chat.completions.create(
        model="qwen2",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=1,
        seed=5,
        n=4,
        max_completion_tokens=200,
    )
    for choice in out.choices:
        _check_calls(choice.message, {"add"})


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_streamed_tool_call_deltas_concatenate_to_the_whole_call(family, request):
    client = _client(request.getfixturevalue(family))
    kwargs = dict(
        model="qwen2" if family == "qwen" else "llama",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        temperature=1,
        seed=9,
        max_completion_tokens=200,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name  # a call's first delta
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and not d.function.name
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert reasons[-1] == "tool_calls" == whole.finish_reason
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]


def test_tool_choice_none_and_auto_answer_with_text(qwen):
    client = _client(qwen)
    for choice in ("none", "auto"):
        out = client.chat.completions.create(
            model="qwen2",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            temperature=0,
            max_completion_tokens=8,
        )
        message = out.choices[0].message
        assert message.tool_calls is None and isinstance(message.content, str)
        assert out.choices[0].finish_reason in ("stop", "length")


def test_tool_messages_and_assistant_calls_render_through_the_template(qwen):
    history = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    status, answer = post_json(qwen, "/tokenize", {"messages": history, "tools": TOOLS})
    assert status == 200
    _, text = post_json(qwen, "/detokenize", {"tokens": answer["tokens"]})
    rendered = text["prompt"]
    # the tools, as the template writes them, the call and the tool's answer
    assert '"name": "get_weather"' in rendered and "<tools>" in rendered
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
        in rendered
    )
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in rendered
    out = _client(qwen).chat.completions.create(
        model="qwen2",
        messages=history,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_completion_tokens=200,
    )
    _check_calls(out.choices[0].message, SCHEMAS)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tool_requests_are_400s_that_name_the_field(qwen, body, param):
    status, answer = post_json(qwen, "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer


def test_the_parser_follows_the_template_unless_named(tmp_path):
    assert parser_for(None, load_tokenizer(write_qwen2_tokenizer(tmp_path / "q"))).name == "hermes"
    assert parser_for(None, load_tokenizer(write_llama3_tokenizer(tmp_path / "l"))).name == "llama3_json"
    assert parser_for("llama3_json", None).name == "llama3_json"


@pytest.mark.parametrize(
    "parser, text, content, calls",
    [
        (HermesParser(), 'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "unit": "F"}}\n'
         "</tool_call>", "Let me check.",
         [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Lima", "unit": "F"}')]),
        (HermesParser(), "No <tool here, a < b.", "No <tool here, a < b.", []),
        (HermesParser(), '<tool_call>\n{"name": "add", "arguments": {"a": 1', None, [("add", '{"a": 1')]),
        (Llama3JsonParser(), '{"name": "add", "parameters": {"a": 3, "b": {"x": [1, "}"]}}}; '
         '{"name": "add", "parameters": {}}', None,
         [("add", '{"a": 3, "b": {"x": [1, "}"]}}'), ("add", "{}")]),
        (Llama3JsonParser(), "The answer is 4.", "The answer is 4.", []),
        (Llama3JsonParser(), '{"no": "name"}', '{"no": "name"}', []),
    ],
)  # fmt: skip
def test_parsers_read_whole_and_streamed_text_alike(parser, text, content, calls):
    request = ToolRequest(TOOLS, "auto", True, parser)
    got_content, got_calls = ToolOutput(request).message(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    stream, streamed_content, pieces = ToolOutput(request), "", {}
    for i, ch in enumerate(text):  # one character at a time: every cut a stream can make
        delta = stream.delta(ch, i == len(text) - 1)
        streamed_content += delta.get("content", "")
        for d in delta.get("tool_calls", []):
            entry = pieces.setdefault(d["index"], ["", ""])
            entry[0] += d["function"].get("name", "")
            entry[1] += d["function"]["arguments"]
    assert streamed_content == (content or "")
    assert [tuple(pieces[i]) for i in sorted(pieces)] == calls
