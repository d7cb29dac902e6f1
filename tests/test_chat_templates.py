"""Chat templates rendered and tokenized as transformers renders and tokenizes them.

Every parity test compares ``server.chat.ChatFormatter`` (``render`` and ``prompt_ids``) with
``AutoTokenizer.from_pretrained(dir).apply_chat_template(...)`` on the same directory: the three
tokenizer styles of ``hf_tokenizers`` with their own templates, and small templates written here that
together use every variable and helper a template is given (messages of every role, tool calls,
``add_generation_prompt``, the special-token variables, ``tools`` through ``tojson``, ``documents``,
``chat_template_kwargs``, ``raise_exception``, ``strftime_now``, loop variables, ``namespace``, loop
controls, ``{% generation %}``, trim_blocks / lstrip_blocks) and the choice among named templates.

Our messages are given in OpenAI's wire form (tool-call arguments as JSON strings, content as text
parts); transformers gets the same conversation as templates see it (``for_transformers``).
"""

from __future__ import annotations

import copy
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import jinja2
import pytest

from engine.errors import CheckpointError
from engine.tokenizer import load_tokenizer
from server.chat import ChatError, ChatFormatter
from server.testing.hf_tokenizers import (
    LLAMA3_SPECIAL_TOKENS,
    QWEN2_ADDED_TOKENS,
    write_llama2_tokenizer,
    write_llama3_tokenizer,
    write_qwen2_tokenizer,
)

transformers = pytest.importorskip("transformers")

STYLES = ("llama3", "qwen2", "llama2")
# (turn start, turn end) special tokens a template of each style writes literally
TURN_TOKENS = {
    "llama3": ("<|start_header_id|>", "<|eot_id|>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "llama2": ("<s>", "</s>"),
}
# every added token of each style (Qwen2's <tool_call> and fim tokens are added but not special)
ALL_ADDED_TOKENS = {
    "llama3": LLAMA3_SPECIAL_TOKENS,
    "qwen2": tuple(t for t, _ in QWEN2_ADDED_TOKENS),
    "llama2": ("<unk>", "<s>", "</s>"),
}
KEEP = object()

# ------------------------------------------------------------------------------------------ inputs

HTML = "<b>bold</b> & 'single' \"double\" </script>"
CONVERSATION = [
    {"role": "system", "content": "You are terse. Ünïcödé: 東京, emoji 🎉."},
    {"role": "user", "content": f"Hello! {HTML}"},
    {"role": "assistant", "content": "Hi — how can I help?"},
    {"role": "user", "content": "Tell me about  spaces\tand\nnewlines.  "},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Température <°C> & 'quotes' — 東京 </tools>",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": 'a city, e.g. "Zürich"'},
                "unit": {"type": "string", "enum": ["°C", "°F"]},
            },
            "required": ["city"],
        },
    },
}
CLOCK_TOOL = {
    "type": "function",
    "function": {"name": "now", "description": "The time <now>", "parameters": {"type": "object"}},
}
TOOLS = [WEATHER_TOOL, CLOCK_TOOL]
# OpenAI's wire form: arguments are JSON strings, a tool-calling reply has null content
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich & <Tokyo>?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "°C"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "東京"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "<clear>"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "18 °C & rain"},
    {"role": "assistant", "content": "Zürich: 21 °C; 東京: 18 °C."},
    {"role": "user", "content": "Thanks!"},
]
DOCUMENTS = [
    {"title": "Zürich <weather>", "text": "Mild & sunny. 'Föhn' winds."},
    {"title": "東京", "text": "梅雨 season: rain."},
]


def for_transformers(messages: list[dict]) -> list[dict]:
    """The conversation as a template sees it: tool-call arguments as objects, text parts joined."""
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        for call in m.get("tool_calls") or ():
            arguments = call["function"].get("arguments")
            if isinstance(arguments, str):
                call["function"]["arguments"] = json.loads(arguments) if arguments else {}
    return out


# --------------------------------------------------------------------------------------- templates

# Indented block tags without '-' modifiers: the output depends on trim_blocks and lstrip_blocks
# ({%+ %} turns lstrip off for one tag); special tokens written literally, the special-token
# variables, loop.first/last/index, {% generation %}.
BASIC_TEMPLATE = """{{ bos_token if bos_token is defined else '' }}
{% for message in messages %}
    {% if loop.first and message.role != 'system' %}
@S@system
(default system)@E@
    {% endif %}
    {% if message.role == 'assistant' %}
@S@assistant
{% generation %}{{ message.content | trim }}{% endgeneration %}@E@
    {% else %}
@S@{{ message.role }}
{{ message.content }}@E@
    {% endif %}
    {%+ if loop.last %}
[last of {{ loop.length }}, index {{ loop.index }}]
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    @S@assistant
{% endif %}
eos={{ eos_token }} unk={{ unk_token | default('-') }} pad={{ pad_token | default('-') }}"""

# tools through tojson (plain, indent, separators + sort_keys), documents, tool calls whose
# arguments are objects, tool results, namespace counters, optional message keys.
TOOLS_TEMPLATE = """
{%- set ns = namespace(calls=0, last_user=-1) -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{%- if tools is not none %}
@S@tools
{% for t in tools %}
{{ t | tojson }}
{% endfor %}
{{ tools | tojson(indent=2) }}
{% if tools %}{{ tools[0].function | tojson(separators=(',', ':'), sort_keys=true) }}{% endif %}@E@
{% endif %}
{% if documents %}
@S@documents
{% for d in documents %}
[{{ loop.index }}] {{ d.title }}: {{ d.text }}
{% endfor %}
@E@
{% endif %}
{% for m in messages %}
{% if m.role == 'assistant' and m.tool_calls is defined %}
@S@assistant{% if m.content is defined %} {{ m.content }}{% endif %}

{% for c in m.tool_calls %}
{% set ns.calls = ns.calls + 1 %}
<call id="{{ c.id }}">{{ c.function.name }}({{ c.function.arguments | tojson }})
city={{ c.function.arguments.city }}</call>
{% endfor %}
@E@
{% elif m.role == 'tool' %}
@S@tool {{ m.tool_call_id }}
{{ m.content }}@E@
{% else %}
@S@{{ m.role }}{% if m.name is defined %} name={{ m.name }}{% endif %}
{% if loop.index0 == ns.last_user %} (last user){% endif %}

{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
{{ m.content }}@E@
{% endif %}
{% endfor %}
calls={{ ns.calls }}
{% if add_generation_prompt %}@S@assistant
{% endif %}"""

# loop controls, chat_template_kwargs (enable_thinking, a custom variable), strftime_now
CONTROL_TEMPLATE = """{{- bos_token if bos_token is defined else '' -}}
Date: {{ strftime_now("%Y-%m-%d") }}
{% for m in messages %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{% if m.content == 'STOP' %}{% break %}{% endif %}
@S@{{ m.role }}
{{ m.content }}@E@
{% endfor %}
{% if note is defined %}note: {{ note }}
{% endif %}
{% if add_generation_prompt %}
@S@assistant
{% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

{% elif enable_thinking is defined and enable_thinking %}
<think>
{% endif %}
{% endif %}"""

# roles must alternate user/assistant
ALTERNATING_TEMPLATE = """{% for m in messages %}
{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
@S@{{ m.role }}
{{ m.content }}@E@
{% endfor %}"""

NAMED_DEFAULT = "DEFAULT{% for m in messages %} {{ m.role }}:{{ m.content }}{% endfor %}"
NAMED_TOOL_USE = (
    "TOOL_USE {{ tools | map(attribute='function.name') | join(',') }}"
    "{% for m in messages %} {{ m.content }}{% endfor %}"
)
JINJA_FILE_TEMPLATE = "JINJA_FILE{% for m in messages %} {{ m.content }}{% endfor %}"
EXTRA_TOOL_TEMPLATE = "EXTRA_TOOL_USE {{ tools | length }}{% for m in messages %} {{ m.content }}{% endfor %}"


def styled(template: str, style: str) -> str:
    start, end = TURN_TOKENS[style]
    return template.replace("@S@", start).replace("@E@", end)


# ---------------------------------------------------------------------------------------- checkouts


class Pair(NamedTuple):
    hf: object  # transformers' tokenizer
    ours: ChatFormatter
    path: Path


class Checkpoints:
    """Tokenizer directories of each style, each loaded once by transformers and once by us; variants
    are copies with other templates."""

    def __init__(self, root: Path):
        self.root = root
        self.base = {
            "llama3": write_llama3_tokenizer(root / "llama3"),
            "qwen2": write_qwen2_tokenizer(root / "qwen2"),
            "llama2": write_llama2_tokenizer(root / "llama2"),
        }
        self.cache: dict[tuple[str, str], Pair] = {}

    def get(self, style: str, variant: str = "own", *, jinja=KEEP, config=KEEP, extra=None) -> Pair:
        """``jinja``: text of chat_template.jinja (None removes it); ``config``: tokenizer_config.json's
        chat_template (None removes it); ``extra``: additional_chat_templates/NAME.jinja texts."""
        key = (style, variant)
        if key not in self.cache:
            path = self.base[style]
            if variant != "own":
                path = self.root / f"{style}-{variant}"
                shutil.copytree(self.base[style], path)
                if jinja is None:
                    (path / "chat_template.jinja").unlink(missing_ok=True)
                elif jinja is not KEEP:
                    (path / "chat_template.jinja").write_text(jinja, encoding="utf-8")
                if config is not KEEP:
                    settings = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
                    settings.pop("chat_template", None)
                    if config is not None:
                        settings["chat_template"] = config
                    (path / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
                for name, text in (extra or {}).items():
                    (path / "additional_chat_templates").mkdir(exist_ok=True)
                    (path / "additional_chat_templates" / f"{name}.jinja").write_text(text, encoding="utf-8")
            hf = transformers.AutoTokenizer.from_pretrained(str(path))
            self.cache[key] = Pair(hf, ChatFormatter(load_tokenizer(path)), path)
        return self.cache[key]

    def own_template(self, style: str, name: str, template: str) -> Pair:
        """A style's directory whose only template is ``template`` (in chat_template.jinja)."""
        return self.get(style, name, jinja=styled(template, style), config=None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("chat_templates"))


def hf_chat(pair: Pair, messages, *, tokenize: bool, hf_messages=None, **kwargs):
    conversation = copy.deepcopy(hf_messages if hf_messages is not None else for_transformers(messages))
    if tokenize:
        return pair.hf.apply_chat_template(
            conversation, tokenize=True, return_dict=False, **copy.deepcopy(kwargs)
        )
    return pair.hf.apply_chat_template(conversation, tokenize=False, **copy.deepcopy(kwargs))


def assert_parity(
    pair: Pair,
    messages,
    *,
    add_generation_prompt: bool,
    tools=None,
    documents=None,
    template_kwargs: dict | None = None,
    hf_messages=None,
) -> tuple[str, list[int]]:
    """Our rendering and token ids equal transformers'; returns them."""
    kwargs = dict(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt)
    expected_text = hf_chat(
        pair, messages, tokenize=False, hf_messages=hf_messages, **kwargs, **(template_kwargs or {})
    )
    expected_ids = hf_chat(
        pair, messages, tokenize=True, hf_messages=hf_messages, **kwargs, **(template_kwargs or {})
    )
    render_kwargs = dict(
        add_generation_prompt=add_generation_prompt,
        tools=copy.deepcopy(tools),
        documents=copy.deepcopy(documents),
        template_kwargs=copy.deepcopy(template_kwargs),
    )
    text = pair.ours.render(copy.deepcopy(messages), **render_kwargs)
    assert text == expected_text
    ids = pair.ours.prompt_ids(copy.deepcopy(messages), **render_kwargs)
    assert ids == expected_ids, (
        pair.hf.convert_ids_to_tokens(expected_ids),
        pair.hf.convert_ids_to_tokens(ids),
    )
    return text, ids


# ------------------------------------------------------------------------- the styles' own templates


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_own_template_conversation(checkpoints, style, add_generation_prompt):
    assert_parity(checkpoints.get(style), CONVERSATION, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_own_template_tools_and_tool_calls(checkpoints, style, add_generation_prompt):
    pair = checkpoints.get(style)
    text, _ = assert_parity(pair, TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=add_generation_prompt)
    # the tool schema's text is written unescaped (tojson does not escape HTML or non-ASCII)
    assert "Température <°C> & 'quotes' — 東京" in text


def test_own_templates_are_found_where_the_styles_put_them(checkpoints):
    llama3, qwen2, llama2 = (checkpoints.get(s) for s in STYLES)
    assert llama3.ours.source == str(llama3.path / "tokenizer_config.json")
    assert qwen2.ours.source == str(qwen2.path / "chat_template.jinja")
    assert sorted(llama2.ours.templates) == sorted(llama2.hf.chat_template) == ["default", "tool_use"]
    # llama2's tool_use template (a named template of tokenizer_config.json) is used with tools
    assert_parity(llama2, TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert llama2.ours.choose(TOOLS) == "tool_use" and llama2.ours.choose(None) == "default"


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_own_template_enable_thinking(checkpoints, style, enable_thinking):
    text, _ = assert_parity(
        checkpoints.get(style),
        CONVERSATION,
        add_generation_prompt=True,
        template_kwargs={"enable_thinking": enable_thinking},
    )
    if style == "qwen2":
        assert text.endswith("<think>\n\n</think>\n\n") is (not enable_thinking)


def test_llama3_template_kwargs(checkpoints):
    text, _ = assert_parity(
        checkpoints.get("llama3"),
        [CONVERSATION[0], *TOOL_CONVERSATION],
        tools=TOOLS,
        add_generation_prompt=True,
        template_kwargs={"tools_in_user_message": False, "date_string": "26 Jul 2024"},
    )
    assert "Today Date: 26 Jul 2024" in text


def assert_both_raise(pair: Pair, messages, name: str, source: Path, **kwargs) -> ChatError:
    """transformers raises TemplateError from raise_exception(); we raise a ChatError with its message,
    naming the template and its file."""
    with pytest.raises(jinja2.TemplateError) as hf_error:
        hf_chat(pair, messages, tokenize=False, add_generation_prompt=True, **kwargs)
    for call in (pair.ours.render, pair.ours.prompt_ids):
        with pytest.raises(ChatError) as e:
            call(copy.deepcopy(messages), **kwargs)
        assert str(hf_error.value) and str(hf_error.value) in str(e.value)
        assert repr(name) in str(e.value) and str(source) in str(e.value)
        assert e.value.param == "messages"
    return e.value


def test_own_templates_raise_exception(checkpoints):
    llama2 = checkpoints.get("llama2")
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    error = assert_both_raise(llama2, not_alternating, "default", llama2.path / "tokenizer_config.json")
    assert "alternate" in str(error)
    llama2_tools = [{"role": "system", "content": "no system here"}, *TOOL_CONVERSATION]
    assert_both_raise(llama2, llama2_tools, "tool_use", llama2.path / "tokenizer_config.json", tools=TOOLS)
    llama3 = checkpoints.get("llama3")
    # tools go into the first user message, and there is none
    assert_both_raise(llama3, CONVERSATION[:1], "default", llama3.path / "tokenizer_config.json", tools=TOOLS)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("form", ["normalizer", "metaspace"])
def test_llama2_tokenizer_forms(tmp_path, form, legacy):
    # transformers' LlamaTokenizer sets a pipeline of its own (the prepend scheme follows 'legacy'):
    # '<s>[INST]' and '</s><s>' are where the forms differ
    path = write_llama2_tokenizer(tmp_path / "llama2", form=form, legacy=legacy)
    pair = Pair(
        transformers.AutoTokenizer.from_pretrained(str(path)), ChatFormatter(load_tokenizer(path)), path
    )
    assert_parity(pair, CONVERSATION, add_generation_prompt=True)
    assert_parity(pair, TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True)


# --------------------------------------------------------------------------- templates of the tests


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_whitespace_control_generation_tag_and_special_token_variables(
    checkpoints, style, add_generation_prompt
):
    pair = checkpoints.own_template(style, "basic", BASIC_TEMPLATE)
    assert_parity(pair, CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert_parity(pair, CONVERSATION[1:], add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("style", STYLES)
def test_special_token_variables_from_chat_template_kwargs(checkpoints, style):
    # a request's variables take precedence over the tokenizer's special tokens, as in transformers
    pair = checkpoints.own_template(style, "basic", BASIC_TEMPLATE)
    assert_parity(
        pair,
        CONVERSATION,
        add_generation_prompt=True,
        template_kwargs={"eos_token": "<END>", "pad_token": "[pad]"},
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_tools_documents_tool_calls_and_namespace(checkpoints, style, add_generation_prompt):
    pair = checkpoints.own_template(style, "tools", TOOLS_TEMPLATE)
    conversation = [CONVERSATION[0], *TOOL_CONVERSATION]
    text, _ = assert_parity(
        pair, conversation, tools=TOOLS, documents=DOCUMENTS, add_generation_prompt=add_generation_prompt
    )
    assert "calls=2" in text and "\"Température <°C> & 'quotes' — 東京 </tools>\"" in text
    assert_parity(pair, conversation, add_generation_prompt=add_generation_prompt)  # tools=None
    assert_parity(pair, conversation, tools=[], documents=[], add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("style", STYLES)
def test_message_forms(checkpoints, style):
    pair = checkpoints.own_template(style, "tools", TOOLS_TEMPLATE)
    # content as text parts; keys whose value is null are left out; name and reasoning_content kept
    ours = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "name": "ada", "content": "Hi", "tool_calls": None, "reasoning_content": None},
        {"role": "assistant", "content": "Hello", "name": None, "reasoning_content": "They said hi."},
        {"role": "developer", "content": [{"type": "text", "text": "dev note"}]},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}},
                {
                    "id": "d",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Köln"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "12:00"},
        {"role": "tool", "tool_call_id": "d", "content": "cold"},
        {"role": "user", "content": [{"type": "text", "text": "ok"}]},
    ]
    assert_parity(pair, ours, tools=TOOLS, add_generation_prompt=True)


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
def test_reasoning_is_passed_under_every_name(checkpoints, key):
    template = (
        "{% for m in messages %}[{{ m.role }}|{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }}]"
        "{% endfor %}"
    )
    pair = checkpoints.get("qwen2", "reasoning", jinja=template, config=None)
    conversation = [CONVERSATION[1], {"role": "assistant", "content": "Hi", key: "They greeted me."}]
    assert_parity(pair, conversation, add_generation_prompt=False)


@pytest.mark.parametrize("style", STYLES)
def test_loop_controls_strftime_now_and_template_kwargs(checkpoints, style):
    pair = checkpoints.own_template(style, "control", CONTROL_TEMPLATE)
    conversation = [
        *CONVERSATION,
        {"role": "user", "content": "STOP"},
        {"role": "assistant", "content": "unseen"},
    ]
    for kwargs in (None, {"enable_thinking": True}, {"enable_thinking": False}, {"note": "Zürich <b>&"}):
        for add_generation_prompt in (True, False):
            text, _ = assert_parity(
                pair, conversation, add_generation_prompt=add_generation_prompt, template_kwargs=kwargs
            )
    assert f"Date: {datetime.now():%Y-%m-%d}\n" in text
    assert "unseen" not in text and CONVERSATION[0]["content"] not in text


@pytest.mark.parametrize("style", STYLES)
def test_template_raise_exception(checkpoints, style):
    pair = checkpoints.own_template(style, "alternating", ALTERNATING_TEMPLATE)
    assert_parity(pair, CONVERSATION[1:3], add_generation_prompt=True)
    error = assert_both_raise(
        pair, [CONVERSATION[1], CONVERSATION[1]], "default", pair.path / "chat_template.jinja"
    )
    assert "must alternate" in str(error)


@pytest.mark.parametrize("style", STYLES)
def test_special_tokens_in_the_template_are_matched_whole(checkpoints, style):
    tokens = ALL_ADDED_TOKENS[style]
    template = "".join(f"x{t}" for t in tokens) + "{% for m in messages %} {{ m.content }}{% endfor %}"
    pair = checkpoints.get(style, "specials", jinja=template, config=None)
    _, ids = assert_parity(pair, [{"role": "user", "content": "plain text"}], add_generation_prompt=True)
    for token in tokens:
        token_id = pair.hf.convert_tokens_to_ids(token)
        assert token_id is not None and ids.count(token_id) == 1, token


# ---------------------------------------------------------------------------- choosing a template


def test_named_templates_in_tokenizer_config(checkpoints):
    pair = checkpoints.get(
        "qwen2",
        "named",
        jinja=None,
        config=[
            {"name": "default", "template": NAMED_DEFAULT},
            {"name": "tool_use", "template": NAMED_TOOL_USE},
        ],
    )
    assert sorted(pair.ours.templates) == sorted(pair.hf.chat_template) == ["default", "tool_use"]
    text, _ = assert_parity(pair, CONVERSATION, add_generation_prompt=True)
    assert text.startswith("DEFAULT")
    text, _ = assert_parity(pair, CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert text.startswith("TOOL_USE get_weather,now")
    text, _ = assert_parity(pair, CONVERSATION, tools=[], add_generation_prompt=True)
    assert text.startswith("TOOL_USE")


def test_chat_template_jinja_takes_precedence_over_tokenizer_config(checkpoints):
    named = [{"name": "default", "template": NAMED_DEFAULT}, {"name": "tool_use", "template": NAMED_TOOL_USE}]
    pair = checkpoints.get("llama2", "jinja-over-list", jinja=JINJA_FILE_TEMPLATE, config=named)
    assert pair.ours.source == str(pair.path / "chat_template.jinja")
    for tools in (None, TOOLS):
        text, _ = assert_parity(pair, CONVERSATION, tools=tools, add_generation_prompt=True)
        assert text.startswith("JINJA_FILE")

    pair = checkpoints.get("llama3", "jinja-over-string", jinja=JINJA_FILE_TEMPLATE)  # config keeps its own
    text, _ = assert_parity(pair, CONVERSATION, add_generation_prompt=True)
    assert text.startswith("JINJA_FILE")


def test_additional_chat_templates(checkpoints):
    pair = checkpoints.get(
        "qwen2",
        "additional",
        jinja=JINJA_FILE_TEMPLATE,
        config=NAMED_DEFAULT,
        extra={"tool_use": EXTRA_TOOL_TEMPLATE},
    )
    assert sorted(pair.ours.templates) == sorted(pair.hf.chat_template) == ["default", "tool_use"]
    text, _ = assert_parity(pair, CONVERSATION, add_generation_prompt=True)
    assert text.startswith("JINJA_FILE")
    text, _ = assert_parity(pair, CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert text.startswith("EXTRA_TOOL_USE 2")


# ------------------------------------------------------------------------------------------ bad input


def test_a_template_that_does_not_parse_is_a_checkpoint_error(checkpoints, tmp_path):
    broken = "{% for m in messages %}{{ m.content }}"  # no endfor
    path = shutil.copytree(checkpoints.base["qwen2"], tmp_path / "broken-jinja")
    (path / "chat_template.jinja").write_text(broken, encoding="utf-8")
    with pytest.raises(jinja2.TemplateSyntaxError):
        transformers.AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
            CONVERSATION, tokenize=False
        )
    tokenizer = load_tokenizer(path)
    with pytest.raises(CheckpointError, match="does not parse") as e:
        ChatFormatter(tokenizer)
    assert str(path / "chat_template.jinja") in str(e.value) and "'default'" in str(e.value)

    path = shutil.copytree(checkpoints.base["llama2"], tmp_path / "broken-config")
    settings = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings["chat_template"] = [
        {"name": "default", "template": NAMED_DEFAULT},
        {"name": "tool_use", "template": "{{ tools | tojson }"},
    ]
    (path / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    with pytest.raises(CheckpointError, match="does not parse") as e:
        ChatFormatter(load_tokenizer(path))
    assert str(path / "tokenizer_config.json") in str(e.value) and "'tool_use'" in str(e.value)


RUNTIME_FAILURES = {
    "type-error": "{{ messages[0].content + 1 }}",
    "undefined": "{{ messages[0].missing.deeper }}",
    "unsafe-attribute": "{{ ''.__class__.__mro__ }}",
    "mutation": "{% set _ = messages.append(1) %}",
    "index": "{{ messages[5].content }}",
    "key": "{{ {'a': 1}['b'].c }}",
}


@pytest.mark.parametrize(
    "name",
    [
        *RUNTIME_FAILURES,
        "zero-division",
        "sandbox-range",
        "recursion",
    ],
)
def test_a_template_that_fails_while_rendering_is_a_chat_error(checkpoints, name):
    template = {
        **RUNTIME_FAILURES,
        "zero-division": "{{ 1 / (messages | length - messages | length) }}",
        "sandbox-range": "{{ range(10 ** 6) | list | length }}",
        "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    }[name]
    pair = checkpoints.get("qwen2", f"fails-{name}", jinja=template, config=None)
    with pytest.raises(Exception):  # noqa: B017 (transformers lets the template's error through)
        hf_chat(pair, CONVERSATION, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ChatError, match="failed") as e:
        pair.ours.render(CONVERSATION)
    assert str(pair.path / "chat_template.jinja") in str(e.value) and "'default'" in str(e.value)


@pytest.mark.parametrize("key", ["messages", "tools", "documents", "add_generation_prompt"])
def test_template_kwargs_may_not_set_request_fields(checkpoints, key):
    pair = checkpoints.get("qwen2")
    with pytest.raises(ChatError, match=key) as e:
        pair.ours.render(CONVERSATION, template_kwargs={key: []})
    assert e.value.param == "chat_template_kwargs"


def test_template_kwargs_must_be_an_object(checkpoints):
    with pytest.raises(ChatError) as e:
        checkpoints.get("qwen2").ours.render(CONVERSATION, template_kwargs=["enable_thinking"])
    assert e.value.param == "chat_template_kwargs"


@pytest.mark.parametrize(
    "call, param",
    [
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
        (dict(messages={"role": "user", "content": "hi"}), "messages"),
        (dict(messages="hi"), "messages"),
        (dict(messages=[]), "messages"),
        (dict(messages=["hi"]), "messages"),
        (dict(messages=[{"role": "user"}]), "messages"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]), "messages"),
        (
            dict(
                messages=[
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{nope"}}],
                    }
                ]
            ),
            "messages",
        ),
        (dict(messages=CONVERSATION, tools=WEATHER_TOOL), "tools"),
        (dict(messages=CONVERSATION, tools="get_weather"), "tools"),
        (dict(messages=CONVERSATION, tools=[{"type": "function"}]), "tools"),
        (dict(messages=CONVERSATION, documents={"title": "t", "text": "x"}), "documents"),
    ],
)
def test_bad_requests_are_chat_errors(checkpoints, call, param):
    pair = checkpoints.get("qwen2")
    with pytest.raises(ChatError) as e:
        pair.ours.render(**copy.deepcopy(call))
    assert e.value.param == param
