"""engine.tokenizer against transformers' AutoTokenizer on tokenizer.json checkpoints.

Three tokenizer families, written by tests/hf_tokenizers.py as their checkpoints publish them
(Llama 3 and Qwen2.5 byte-level BPE, Llama 2 sentencepiece-style BPE with byte fallback): the same
ids as ``AutoTokenizer`` on a torture corpus, the same text when decoding (any id sequence, with and
without special tokens), streaming deltas that add up to the decode and never split a character,
and the same special tokens and chat templates.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

import server.testing.hf_tokenizers as H
from engine.errors import CheckpointError
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

REPLACEMENT = "\ufffd"

TORTURE = [
    "",
    "Hello",
    "plain words and punctuation, like this: yes! no? maybe...",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "runs  of   spaces    and\ttabs\t\tand\n\nnewlines\n\n\n",
    " ",
    "\n",
    "\t",
    "   ",
    "line\r\nwindows\rold mac\n",
    "中文分词和日本語のテキスト，还有한국어",
    "東京は日本の首都です。我们今天去北京看长城。",
    "emoji 🎉🚀 with modifiers 👍🏽 and a family 👨\u200d👩\u200d👧 and flags 🇯🇵🏳️\u200d🌈",
    "🧑🏿\u200d💻🧑🏿\u200d💻🧑🏿\u200d💻",
    "rare: 🦩 齉 𠀋 ꙮ (astral and unseen characters)",
    "齉齉𠀋🦩ꙮ🦩",  # consecutive byte-fallback characters: one run of byte tokens
    "combining: e\u0301 vs \u00e9, a\u0308, n\u0303, Z\u0351\u0364\u0307, \u0915\u094d\u0937",
    "digits 1234567890 3.14159 -42 1e10 ٣٤ Ⅻ ² 0000",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": "value", "n": [1, 2.5, null, true]}',
    "don't it's we're I'M YOU'LL they'd",
    "a<|eot_id|>b",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|im_start|>user",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    "x </s> y<s>z<unk>",
    "<s>",
    "</s></s>",
    " <|eot_id|> spaced special ",
    "<|eot_id|",
    "<<s>> <|im_start <tool_call",
    REPLACEMENT,
    f"replacement {REPLACEMENT}{REPLACEMENT} inside",
    "control \x00\x01\x07\x1b[0m\x7f\x85 chars",
    "nbsp\u00a0ideographic\u3000space\u2028line sep\ufeffbom",
    "\u2581metaspace char\u2581\u2581 literally",
    "<0x41> looks like a byte token",
    "a" * 80,
    "!!!!!!!!?????......",
    "MiXeD CaSe ÀÉÎÕÜ ß ﬁ ligature",
]

# name -> (writer, options). llama2 is Llama 2's tokenizer.json (normalizer Prepend + Replace),
# mistral the later form of the same tokenizer (Metaspace pre-tokenizer).
STYLES = {
    "llama3": (H.write_llama3_tokenizer, {}),
    "qwen2": (H.write_qwen2_tokenizer, {}),
    "llama2": (H.write_llama2_tokenizer, {}),
    "mistral": (H.write_llama2_tokenizer, {"form": "metaspace"}),
}
BYTE_LEVEL = {"llama3", "qwen2"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table of byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_ids(hf, style: str) -> dict[int, int]:
    """byte value -> id of the token that is exactly that byte."""
    if style in BYTE_LEVEL:
        table = _bytes_to_unicode()
        return {b: hf.convert_tokens_to_ids(c) for b, c in table.items()}
    return {b: hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}


@pytest.fixture(scope="module", params=list(STYLES))
def case(request, tmp_path_factory):
    style = request.param
    writer, options = STYLES[style]
    directory = writer(tmp_path_factory.mktemp(style), **options)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    tok = load_tokenizer(directory)
    byte_ids = _byte_ids(hf, style)
    assert all(isinstance(i, int) for i in byte_ids.values())
    added = sorted(hf.added_tokens_decoder)
    base = [i for i in range(len(hf)) if i not in set(added)]
    return SimpleNamespace(
        style=style, dir=directory, hf=hf, tok=tok, byte_ids=byte_ids, added=added, base=base
    )


def _random_ids(case, rng: random.Random, n: int) -> list[int]:
    """A mix of ordinary tokens, lone bytes (continuation bytes first, incomplete and invalid
    sequences), special and non-special added tokens, and ids past the vocabulary."""
    hf, b, added, base = case.hf, case.byte_ids, case.added, case.base
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(base))
        elif r < 0.55:
            out.append(b[rng.randrange(0x80, 0xC0)])  # continuation byte
        elif r < 0.7:
            out.append(b[rng.choice([0xC3, 0xE4, 0xE6, 0xF0, 0xF4])])  # lead byte
        elif r < 0.75:
            out.append(b[rng.choice([0xC0, 0xC1, 0xF5, 0xFE, 0xFF])])  # never valid
        elif r < 0.9:
            out.append(rng.choice(added))
        elif r < 0.95:
            out.append(b[rng.randrange(0x20, 0x7F)])
        else:
            out.append(len(hf) + rng.randrange(3))  # a padded model vocabulary
    return out


def _byte_sequences(case) -> list[list[int]]:
    b = case.byte_ids
    eos = case.hf.convert_tokens_to_ids(case.hf.eos_token)
    hi = case.tok.encode("hi", add_special_tokens=False)
    return [
        [b[0x80]],  # a continuation byte first
        [b[0xBF], b[0xBF]],
        [b[0xE4], b[0xB8]],  # incomplete 中
        [b[0xE4], b[0xB8], b[0xAD]],  # 中
        [b[0xE4], b[0xB8], *hi],  # incomplete, then text
        [b[0xE4], eos, b[0xB8], b[0xAD]],  # a special token inside a character
        [b[0xF0], b[0x9F], b[0x98], b[0x80]],  # 😀
        [b[0xF0], b[0x9F], b[0x98]],
        [b[0xC0], b[0xAF]],  # overlong
        [b[0xED], b[0xA0], b[0x80]],  # an encoded surrogate
        [b[0xFF], *hi, b[0x80]],
        [*hi, b[0xE4]],
    ]


def _stream(tok, prompt: list[int], out: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.push(i) for i in out]
    deltas.append(detok.flush())
    return deltas


# ---------------------------------------------------------------------------------------- encode


def test_backend_and_vocabulary(case):
    assert case.tok.backend == "tokenizers"
    assert case.tok.vocab_size == len(case.hf)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(case, add_special_tokens):
    diffs = []
    for text in TORTURE:
        want = case.hf(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert case.hf.encode(text, add_special_tokens=add_special_tokens) == want
        got = case.tok.encode(text, add_special_tokens=add_special_tokens)
        if got != want:
            diffs.append((text, got, want))
    assert not diffs, "\n".join(f"{t!r}: engine {g} transformers {w}" for t, g, w in diffs)


def test_default_encode_adds_special_tokens(case):
    for text in TORTURE[:8]:
        assert case.tok.encode(text) == case.hf(text)["input_ids"]


def test_bos_only_where_the_tokenizer_adds_one(case):
    ids = case.tok.encode("hi")
    if case.style == "qwen2":
        assert case.tok.bos_id is None and ids == case.tok.encode("hi", add_special_tokens=False)
    else:
        assert ids[0] == case.tok.bos_id and ids[1:] == case.tok.encode("hi", add_special_tokens=False)


# ---------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_of_corpus_ids_matches_transformers(case, skip_special_tokens):
    diffs = []
    for text in TORTURE:
        ids = case.hf(text)["input_ids"]
        want = case.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        got = case.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if got != want:
            diffs.append((ids, got, want))
    assert not diffs, "\n".join(f"{i}: engine {g!r} transformers {w!r}" for i, g, w in diffs)


def test_round_trip_of_plain_text(case):
    """Text without special-token lookalikes comes back as it went in (Qwen's NFC aside)."""
    for text in TORTURE:
        if "<" in text or text.startswith(" ") or (case.style == "qwen2" and "\u0301" in text):
            continue
        if case.style in ("llama2", "mistral") and (text.strip(" ") != text or "\u2581" in text):
            continue  # the dummy-prefix space is stripped; a literal "▁" decodes as a space
        assert case.tok.decode(case.tok.encode(text)) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_of_random_ids_matches_transformers(case, skip_special_tokens):
    rng = random.Random(7)
    sequences = _byte_sequences(case) + [_random_ids(case, rng, rng.randint(0, 12)) for _ in range(300)]
    diffs = []
    for ids in sequences:
        want = case.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        got = case.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if got != want:
            diffs.append((ids, got, want))
    assert not diffs, "\n".join(f"{i}: engine {g!r} transformers {w!r}" for i, g, w in diffs[:20])


def test_lone_bytes_decode_to_replacement_characters(case):
    b = case.byte_ids
    for ids in ([b[0x80]], [b[0xE4], b[0xB8]], [b[0xFF]]):
        text = case.tok.decode(ids)
        assert REPLACEMENT in text and text == case.hf.decode(ids, skip_special_tokens=True)
    assert case.tok.decode([b[0xE4], b[0xB8], b[0xAD]]) == "中"


def test_ids_past_the_vocabulary_decode_to_nothing(case):
    hi = case.tok.encode("hi", add_special_tokens=False)
    n = case.tok.vocab_size
    assert case.tok.decode([n, n + 5]) == ""
    assert case.tok.decode([n, *hi, n + 1]) == case.tok.decode(hi) == case.hf.decode(hi)


# ------------------------------------------------------------------------------------- streaming


def _expected_delta_text(tok, prompt: list[int], out: list[int]) -> str:
    head, full = tok.decode(prompt), tok.decode(prompt + out)
    assert full.startswith(head), (prompt, out, head, full)
    return full[len(head) :]


@pytest.mark.parametrize("prompt_text", [None, "Prompt: 中文 ok"])
def test_streaming_corpus_texts_adds_up_to_the_decode(case, prompt_text):
    tok = case.tok
    if prompt_text is None:
        prompt = [tok.bos_id] if tok.bos_id is not None else []
    else:
        prompt = tok.encode(prompt_text)
    for text in TORTURE:
        out = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok, prompt, out)
        expected = _expected_delta_text(tok, prompt, out)
        assert "".join(deltas) == expected, (text, deltas)
        if case.style in BYTE_LEVEL:
            assert expected == tok.decode(out)
        if REPLACEMENT not in expected:
            assert not any(REPLACEMENT in d for d in deltas), (text, deltas)


def test_streaming_hands_out_whole_characters_as_soon_as_they_are_complete(case):
    """Whenever the text so far ends in a whole character, all of it has been handed out (with a
    byte-fallback decoder: once a run of byte tokens has ended, since a later byte of the run can
    still turn all of it into U+FFFD)."""
    tok = case.tok
    prompt = tok.encode("Start:")
    for text in TORTURE:
        if REPLACEMENT in text:
            continue
        out = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt)
        emitted = ""
        for k, token_id in enumerate(out, 1):
            emitted += detok.push(token_id)
            so_far = _expected_delta_text(tok, prompt, out[:k])
            if not so_far.endswith(REPLACEMENT) and token_id not in tok.run_byte_ids:
                assert emitted == so_far, (text, k, emitted, so_far)


def test_streaming_random_ids_adds_up_to_the_decode(case):
    tok = case.tok
    rng = random.Random(11)
    prompts = [tok.encode("Prompt: 中文 ok"), tok.encode("x", add_special_tokens=False)]
    sequences = _byte_sequences(case) + [_random_ids(case, rng, rng.randint(1, 16)) for _ in range(150)]
    for n, out in enumerate(sequences):
        prompt = prompts[n % len(prompts)]
        deltas = _stream(tok, prompt, out)
        expected = _expected_delta_text(tok, prompt, out)
        assert "".join(deltas) == expected, (out, deltas, expected)
        if case.style in BYTE_LEVEL:
            assert expected == tok.decode(out)


def test_streaming_holds_back_an_incomplete_character(case):
    b = case.byte_ids
    tok = case.tok
    detok = IncrementalDetokenizer(tok, tok.encode("a"))
    assert detok.push(b[0xE4]) == ""
    assert detok.push(b[0xB8]) == ""
    if tok.run_byte_ids:  # byte-fallback: the run is settled when it ends
        assert detok.push(b[0xAD]) == ""
        assert detok.push(tok.encode("!", add_special_tokens=False)[-1]).startswith("中")
    else:
        assert detok.push(b[0xAD]) == "中"
    assert detok.flush() == ""


def test_streaming_releases_bytes_that_never_form_a_character(case):
    """A lone continuation byte is handed out (as U+FFFD) once the following text settles it, not
    only at the end of the sequence."""
    b = case.byte_ids
    tok = case.tok
    word = tok.encode(" word", add_special_tokens=False)
    out = [b[0x80]] + word * 6
    deltas = _stream(tok, tok.encode("a"), out)
    assert "".join(deltas) == _expected_delta_text(tok, tok.encode("a"), out)
    assert REPLACEMENT in "".join(deltas[:-1])


def test_streaming_a_run_of_byte_tokens_is_decoded_as_a_whole(case):
    """Llama 2's ByteFallback decoder turns every byte of a run of byte tokens into U+FFFD when the
    run as a whole is not valid UTF-8, ASCII bytes and complete characters included: "<0x0A>" alone
    is "\\n", "<0x0A><0xE4>" is two U+FFFD. Text from a run is settled only when the run ends."""
    b = case.byte_ids
    tok = case.tok
    hi = tok.encode("hi", add_special_tokens=False)
    eos = tok.eos_id
    prompt = tok.encode("a")
    for out in (
        [b[0x0A], b[0xE4], *hi],  # Llama 2 writes "\n" as <0x0A>: then an invalid byte
        [b[0x41]] * 5 + [b[0xE4], b[0xB8], *hi],
        [b[0xEF], b[0xBF], b[0xBD]] * 2 + hi,  # U+FFFD itself, twice
        [b[0xE4], b[0xB8], b[0xAD], b[0xE4], b[0xB8], b[0xAD], b[0xE4], *hi],
        [b[0x24], eos, b[0x80], *hi],  # a skipped special token does not end the run
    ):
        deltas = _stream(tok, prompt, out)
        assert "".join(deltas) == _expected_delta_text(tok, prompt, out), (out, deltas)


# --------------------------------------------------------------------------- special tokens, templates


def test_bos_and_eos(case):
    hf, tok = case.hf, case.tok
    assert tok.bos_token == hf.bos_token
    assert tok.eos_token == hf.eos_token
    assert tok.bos_id == hf.bos_token_id
    assert tok.eos_id == hf.eos_token_id


def test_special_ids_are_the_special_added_tokens(case):
    hf = case.hf
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert set(case.tok.special_ids) == special
    assert set(hf.all_special_ids) <= set(case.tok.special_ids)
    non_special = {i for i, t in hf.added_tokens_decoder.items() if not t.special}
    assert not non_special & set(case.tok.special_ids)


def test_token_to_id(case):
    hf, tok = case.hf, case.tok
    for i, t in hf.added_tokens_decoder.items():
        assert tok.token_to_id(t.content) == i
    vocab = hf.get_vocab()
    for token in list(vocab)[::37]:
        assert tok.token_to_id(token) == vocab[token]
    assert tok.token_to_id("<|no such token|>") is None


def test_chat_templates(case):
    want = case.hf.chat_template
    want = want if isinstance(want, dict) else {"default": want}
    assert case.tok.chat_templates == want
    expected_names = {"llama2": {"default", "tool_use"}, "mistral": {"default", "tool_use"}}
    assert set(want) == expected_names.get(case.style, {"default"})


def test_describe(case):
    info = case.tok.describe()
    json.dumps(info)
    assert info["backend"] == "tokenizers"


# ---------------------------------------------------------------------------------- loading, variants


def test_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer as RustTokenizer

    directory = H.write_sentencepiece_tokenizer(tmp_path, tokenizer_json=True)
    tok = load_tokenizer(directory)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    raw = RustTokenizer.from_file(str(directory / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    assert tok.backend == "tokenizers"
    assert tok.vocab_size == len(hf) == raw.get_vocab_size() != sp.get_piece_size()
    for text in ("Hello world", "中文 🎉 x", "def f(x):\n\treturn 12345"):
        assert tok.encode(text) == hf(text)["input_ids"] == raw.encode(text).ids
        assert hf(text, add_special_tokens=False)["input_ids"] != sp.encode(text)


def test_sentencepiece_model_alone(tmp_path):
    import sentencepiece as spm

    directory = H.write_sentencepiece_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tok = load_tokenizer(directory)
    assert tok.backend == "sentencepiece"
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    for text in ("Hello world", "中文 🎉 x", "digits 12345", "  two spaces"):
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)]
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_no_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json|tokenizer\.model"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    directory = H.write_llama3_tokenizer(tmp_path)
    (directory / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_tokenizer(directory)


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model"):
        load_tokenizer(tmp_path)


def _edit_json(path, **changes):
    """Set keys (None in tokenizer_config.json's changes removes the key)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None and path.name == "tokenizer_config.json":
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# (writer, writer options, tokenizer_config.json changes, tokenizer.json changes): transformers 5
# ignores add_bos_token/add_eos_token in tokenizer_config.json whenever tokenizer.json is there,
# and rebuilds the pipeline of a LlamaTokenizer from tokenizer.json's vocabulary and merges.
VARIANTS = {
    "llama3-add_bos_token-false": (H.write_llama3_tokenizer, {}, {"add_bos_token": False}, {}),
    "llama3-add_eos_token-true": (H.write_llama3_tokenizer, {}, {"add_eos_token": True}, {}),
    "llama3-no-post-processor": (H.write_llama3_tokenizer, {}, {}, {"post_processor": None}),
    "qwen2-add_bos_token-true": (
        H.write_qwen2_tokenizer,
        {},
        {"add_bos_token": True, "bos_token": "<|endoftext|>"},
        {},
    ),
    "llama2-no-post-processor": (H.write_llama2_tokenizer, {}, {}, {"post_processor": None}),
    "llama2-fast-class": (H.write_llama2_tokenizer, {"tokenizer_class": "PreTrainedTokenizerFast"}, {}, {}),
    "llama2-legacy": (H.write_llama2_tokenizer, {"legacy": True}, {}, {}),
    "mistral-legacy": (H.write_llama2_tokenizer, {"form": "metaspace", "legacy": True}, {}, {}),
    "llama3-llama-class": (H.write_llama3_tokenizer, {"tokenizer_class": "LlamaTokenizerFast"}, {}, {}),
    "qwen2-config-template": (H.write_qwen2_tokenizer, {"template_file": False}, {}, {}),
    # special_tokens_map.json is read only when tokenizer_config.json has no added_tokens_decoder
    "llama3-special-map-only": (
        H.write_llama3_tokenizer,
        {},
        {"added_tokens_decoder": None, "bos_token": None, "eos_token": None},
        {},
    ),
    "llama3-eos-missing-from-config": (H.write_llama3_tokenizer, {}, {"eos_token": None}, {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_transformers(tmp_path, variant):
    writer, options, config_changes, json_changes = VARIANTS[variant]
    directory = writer(tmp_path, **options)
    if config_changes:
        _edit_json(directory / "tokenizer_config.json", **config_changes)
    if json_changes:
        _edit_json(directory / "tokenizer.json", **json_changes)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    tok = load_tokenizer(directory)
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    diffs = []
    for text in TORTURE:
        for add in (True, False):
            got, want = (
                tok.encode(text, add_special_tokens=add),
                hf(text, add_special_tokens=add)["input_ids"],
            )
            if got != want:
                diffs.append(f"{text!r} add_special_tokens={add}: engine {got} transformers {want}")
        ids = hf(text)["input_ids"]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert not diffs, "\n".join(diffs[:8])
    want = hf.chat_template if isinstance(hf.chat_template, dict) else {"default": hf.chat_template}
    assert tok.chat_templates == want


def test_additional_chat_templates_directory(tmp_path):
    directory = H.write_qwen2_tokenizer(tmp_path)
    (directory / "additional_chat_templates").mkdir()
    (directory / "additional_chat_templates" / "rag.jinja").write_text("{{ messages }}")
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert load_tokenizer(directory).chat_templates == hf.chat_template
    assert set(hf.chat_template) == {"default", "rag"}
