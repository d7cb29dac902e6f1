"""Hugging Face tokenizer directories written the way real checkpoints publish them, for the tokenizer
tests and benchmarks.

Each writer trains a small byte-pair-encoding model with the ``tokenizers`` library on a generated corpus
(English, code, digits, CJK, emoji with ZWJ sequences and modifiers, combining marks, runs of whitespace),
wraps it in the normalizer / pre-tokenizer / post-processor / decoder pipeline of the family it imitates,
and writes ``tokenizer.json`` plus ``tokenizer_config.json`` (and, where that family does,
``special_tokens_map.json`` and ``chat_template.jinja``) into the given directory, which it returns.
Nothing is cached: every call trains again (well under a second).

- :func:`write_llama3_tokenizer`: Llama 3.1 Instruct (byte-level BPE, regex Split, BOS by the
  post-processor, ``PreTrainedTokenizerFast``, chat template string in ``tokenizer_config.json``).
- :func:`write_qwen2_tokenizer`: Qwen2.5 (byte-level BPE, digit-by-digit regex, NFC, no BOS, non-special
  added tokens, ``Qwen2Tokenizer``, ``eos_token`` as an ``AddedToken`` dict, ``chat_template.jinja``).
- :func:`write_llama2_tokenizer`: Llama 2 / Mistral (sentencepiece-style BPE with byte fallback and
  ``<0x00>``..``<0xFF>`` pieces, ``LlamaTokenizer``, a list of named chat templates).
- :func:`write_sentencepiece_tokenizer`: a Llama 2 style sentencepiece ``tokenizer.model`` (optionally
  with a tokenizer.json next to it).

``STYLES`` maps a short name to each writer, for parametrized tests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# The pre-tokenizer regexes exactly as the published tokenizer.json files have them.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPIECE_UNDERLINE = "\u2581"

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are have not had but "
    "tokenizer token model inference runtime stream decode encode prompt reply server request batch cache "
    "hello world quick brown fox jumps over lazy dog naïve café résumé coöperate façade über straße "
    "don't it's we're they've I'm you'll he'd LLaMA Qwen Mistral GPU CPU HTTP JSON"
).split()
_CJK = (
    "中文分词和日本語のテキスト",
    "还有한국어문장입니다",
    "我们今天去北京看长城。",
    "東京は日本の首都です。",
    "机器学习模型推理服务",
    "你好，世界！这是一个测试。",
    "ひらがなとカタカナ、漢字",
    "「引用」『二重』【括弧】",
)
_EMOJI = (
    "🎉",
    "🚀",
    "😀",
    "👍🏽",
    "👨\u200d👩\u200d👧",
    "🏳️\u200d🌈",
    "🇯🇵",
    "❤️",
    "🤖",
    "✨",
    "🧑🏿\u200d💻",
)
_CODE = (
    "def main(argv: list[str]) -> int:\n    return 0\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    'if __name__ == "__main__":\n    print(f"{x!r} = {y:.3f}")\n',
    "const xs = [1, 2, 3].map((x) => x ** 2); // squares\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;\n",
    '{"key": "value", "list": [1, 2.5, null, true], "nested": {"a": "b"}}\n',
    "    # indented comment\n        deeper = {'k': (1, 2)}\n",
    '<div class="note">&amp; &lt;tag&gt;</div>\n',
)
_MARKS = ("e\u0301", "a\u0308", "n\u0303", "\u0915\u094d\u0937", "\u05e9\u05c1\u05b8", "Z\u0351\u0364\u0307")


def training_corpus(seed: int = 0, lines: int = 600) -> list[str]:
    """A deterministic mixed corpus: prose, code, digits, CJK, emoji, combining marks and whitespace runs."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        kind = i % 6
        if kind == 0:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) + rng.choice(".!?,;:"))
        elif kind == 1:
            out.append(rng.choice(_CODE))
        elif kind == 2:
            out.append("".join(rng.choice(_CJK) for _ in range(rng.randint(1, 3))))
        elif kind == 3:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 6))]
            words.insert(rng.randrange(len(words) + 1), "".join(rng.choice(_EMOJI) for _ in range(3)))
            out.append(" ".join(words))
        elif kind == 4:
            number = str(rng.randint(0, 10 ** rng.randint(1, 9)))
            out.append(
                f"{rng.choice(_WORDS)} {number} {rng.random():.4f} 2024-0{rng.randint(1, 9)}-1{i % 10}"
            )
        else:
            ws = rng.choice(("  ", "   ", "\t", "\n", "\n\n", " \n", "\t\t", "    "))
            out.append(ws.join([rng.choice(_WORDS), rng.choice(_MARKS), rng.choice(_WORDS)]) + ws)
    return out


def _train_bpe(pre_tokenizer, normalizer, vocab_size: int, byte_level: bool) -> tuple[dict, list]:
    """Vocabulary and merges of a BPE trained on the corpus with the given pre-tokenization."""
    tok = Tokenizer(BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    # byte-level: all 256 byte symbols; sentencepiece-style: the commoner characters only, the rest
    # are left to byte fallback
    alphabet = (
        dict(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()) if byte_level else dict(limit_alphabet=250)
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[], **alphabet
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _added(content: str, special: bool = True, normalized: bool = False) -> AddedToken:
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=normalized, special=special
    )


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict]:
    """``added_tokens_decoder`` of tokenizer_config.json, as transformers writes it."""
    entries = json.loads(tok.to_str())["added_tokens"]
    return {
        str(t["id"]): {
            "content": t["content"],
            "lstrip": t["lstrip"],
            "normalized": t["normalized"],
            "rstrip": t["rstrip"],
            "single_word": t["single_word"],
            "special": t["special"],
        }
        for t in entries
    }


def _token_dict(content: str, with_type: bool = False) -> dict:
    d = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **d} if with_type else d


def _write(directory: Path, name: str, data) -> None:
    if isinstance(data, str):
        (directory / name).write_text(data, encoding="utf-8")
    else:
        (directory / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare(directory, model_type: str | None, architecture: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model_type is not None:
        _write(directory, "config.json", {"architectures": [architecture], "model_type": model_type})
    return directory


# --------------------------------------------------------------------------------------------- Llama 3

LLAMA3_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, " }}
    {{- "please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": ' }}
    {{- 'dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'ipython', 'tool'] %}
        {{- raise_exception("Unknown message role: " + message['role']) }}
    {%- endif %}
    {%- if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
            {{- "<|eot_id|>" }}
        {%- endfor %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Llama 3.1's first special tokens, in their order (128000.. in the real vocabulary).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|reserved_special_token_3|>",
    "<|reserved_special_token_4|>",
    "<|reserved_special_token_5|>",
)


def write_llama3_tokenizer(
    directory,
    *,
    vocab_size: int = 800,
    tokenizer_class: str = "PreTrainedTokenizerFast",
    eos_token: str = "<|eot_id|>",
    model_type: str | None = None,
) -> Path:
    """A Llama 3.1 Instruct tokenizer directory (tokenizer.json, tokenizer_config.json and
    special_tokens_map.json).

    ``model_type`` also writes a minimal config.json (transformers' AutoTokenizer consults its
    ``model_type`` when choosing the tokenizer class)."""
    directory = _prepare(directory, model_type, "LlamaForCausalLM")
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    vocab, merges = _train_bpe(pre, None, vocab_size, byte_level=True)
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.add_special_tokens([_added(t) for t in LLAMA3_SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))],
            ),
        ]
    )
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": bos,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": eos_token,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": tokenizer_class,
    }
    _write(directory, "tokenizer_config.json", config)
    _write(
        directory,
        "special_tokens_map.json",
        {"bos_token": _token_dict(bos), "eos_token": _token_dict(eos_token)},
    )
    return directory


# --------------------------------------------------------------------------------------------- Qwen2.5

QWEN2_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments " }}
    {{- "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n" }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. ' }}
        {{- 'You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
           or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# (content, special) in Qwen2.5's order (151643.. in the real vocabulary).
QWEN2_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|vision_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|file_sep|>", False),
)


def write_qwen2_tokenizer(
    directory,
    *,
    vocab_size: int = 800,
    tokenizer_class: str = "Qwen2Tokenizer",
    template_file: bool = True,
    model_type: str | None = None,
) -> Path:
    """A Qwen2.5 tokenizer directory: tokenizer.json, tokenizer_config.json and chat_template.jinja
    (``template_file=False`` puts the template in tokenizer_config.json instead)."""
    directory = _prepare(directory, model_type, "Qwen2ForCausalLM")
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    vocab, merges = _train_bpe(pre, normalizers.NFC(), vocab_size, byte_level=True)
    tok = Tokenizer(
        BPE(
            vocab,
            merges,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in QWEN2_ADDED_TOKENS:
        if special:
            tok.add_special_tokens([_added(content)])
        else:
            tok.add_tokens([_added(content, special=False)])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "additional_special_tokens": [
            c for c, special in QWEN2_ADDED_TOKENS if special and c != "<|endoftext|>"
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": _token_dict("<|im_end|>", with_type=True),
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "unk_token": None,
    }
    if template_file:
        _write(directory, "chat_template.jinja", QWEN2_CHAT_TEMPLATE)
    else:
        config["chat_template"] = QWEN2_CHAT_TEMPLATE
    _write(directory, "tokenizer_config.json", config)
    return directory


# --------------------------------------------------------------------------------------------- Llama 2

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
LLAMA2_TOOL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.last and tools %}{{ '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}"
    "{% endif %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message.tool_calls %}{{ '[TOOL_CALLS] ' + message.tool_calls | tojson }}"
    "{% else %}{{ ' ' + message['content'] }}{% endif %}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '[TOOL_RESULTS] ' + message['content'] | tojson + '[/TOOL_RESULTS]' }}"
    "{% else %}{{ raise_exception('Only user, assistant and tool roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def write_llama2_tokenizer(
    directory,
    *,
    vocab_size: int = 700,
    form: str = "normalizer",
    tokenizer_class: str = "LlamaTokenizer",
    legacy: bool = False,
    model_type: str | None = None,
) -> Path:
    """A Llama 2 / Mistral tokenizer directory (tokenizer.json, tokenizer_config.json and
    special_tokens_map.json).

    ``form="normalizer"`` is Llama 2's tokenizer.json (normalizer Prepend("▁") + Replace(" ", "▁"), no
    pre-tokenizer); ``form="metaspace"`` is the later form (Metaspace pre-tokenizer, prepend_scheme "first",
    no normalizer). Ids: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258, then the trained pieces."""
    if form not in ("normalizer", "metaspace"):
        raise ValueError(f"unknown form {form!r}")
    directory = _prepare(directory, model_type, "LlamaForCausalLM")
    # sentencepiece never merges across a word boundary: train on "▁word" pieces
    train_pre = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    trained, merges = _train_bpe(train_pre, None, vocab_size, byte_level=False)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(trained, key=trained.get):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if form == "normalizer":
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
        )
        tok.pre_tokenizer = None
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_UNDERLINE, prepend_scheme="first", split=False
        )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens([_added("<unk>"), _added("<s>"), _added("</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": "<s>",
        "chat_template": [
            {"name": "default", "template": LLAMA2_CHAT_TEMPLATE},
            {"name": "tool_use", "template": LLAMA2_TOOL_TEMPLATE},
        ],
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": legacy,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    _write(directory, "tokenizer_config.json", config)
    _write(
        directory,
        "special_tokens_map.json",
        {
            "bos_token": _token_dict("<s>"),
            "eos_token": _token_dict("</s>"),
            "unk_token": _token_dict("<unk>"),
        },
    )
    return directory


# ------------------------------------------------------------------------------- sentencepiece only


def write_sentencepiece_tokenizer(
    directory, *, vocab_size: int = 600, add_bos_token: bool = True, tokenizer_json: bool = False
) -> Path:
    """A Llama 2 style ``tokenizer.model`` (sentencepiece BPE, byte fallback, dummy prefix, digits split)
    with a tokenizer_config.json naming ``LlamaTokenizer``; ``tokenizer_json=True`` also writes a
    (different, independently trained) Llama 2 style tokenizer.json next to it."""
    import io
    import os

    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus(seed=1)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=max(1, min(2, os.cpu_count() or 1)),
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    if tokenizer_json:
        write_llama2_tokenizer(directory)
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": _token_dict("<s>", with_type=True),
        "clean_up_tokenization_spaces": False,
        "eos_token": _token_dict("</s>", with_type=True),
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _token_dict("<unk>", with_type=True),
    }
    _write(directory, "tokenizer_config.json", config)
    return directory


STYLES: dict[str, Callable[..., Path]] = {
    "llama3": write_llama3_tokenizer,
    "qwen2": write_qwen2_tokenizer,
    "llama2": write_llama2_tokenizer,
}


def write_tokenizer(style: str, directory, **options) -> Path:
    """The tokenizer directory of one of ``STYLES``."""
    return STYLES[style](directory, **options)


def check_text_offsets(decode, text: str, ids: list[int], offsets: list[int]) -> None:
    """Completions' ``text_offset`` indexes ``text``: each offset is the length of the decoding of
    some whole run of the tokens before it (a token whose character a later one completes adds
    nothing), and exactly theirs when those decode to whole characters."""
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
    for i, offset in enumerate(offsets):
        cuts = {len(d) for d in (decode(ids[:j]) for j in range(i + 1)) if text.startswith(d)}
        assert offset in cuts, (i, offset, cuts)
        if "\ufffd" not in decode(ids[:i]):
            assert offset == len(decode(ids[:i]))
