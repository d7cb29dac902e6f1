"""Tokenizer round trips, incremental detokenization and text-level stopping."""

import pytest

from engine.generate import Generator
from engine.request import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

TEXTS = [
    "plain words",
    "line one\nline two\n\nafter a blank line\n",
    "runs of spaces:  two,   three,    four; tabs\t\tand trailing   ",
    "   leading spaces",
    "中文分词和日本語のテキスト，还有한국어",
    "emoji 🎉🚀 with modifiers 👍🏽 and a family 👨‍👩‍👧",
    "mixed: café 100% — “quotes” ∑ ∫ ≠ 😀\r\n",
]


@pytest.fixture(scope="module")
def tok(tiny_demo):
    return load_tokenizer(tiny_demo)


@pytest.mark.parametrize("text", TEXTS)
def test_exact_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode(text)[0] == tok.bos_id
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_emits_whole_characters(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [tok.bos_id])
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # multi-byte characters are split over several byte-fallback pieces, so some deltas are held back
    if any(ord(c) > 0x7FF for c in text):
        assert "" in deltas[:-1]


def test_ids_outside_the_tokenizer_vocabulary_decode_to_nothing(tok):
    assert tok.decode([tok.vocab_size, tok.vocab_size + 5]) == ""


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


def test_stop_string_truncates_text_and_ends_with_stop(gen):
    prompt = gen.tokenizer.encode("Count")
    free = gen.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert len(free.text) > 6
    stop = free.text[3:5]
    out = gen.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[
        0
    ]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]
    assert len(out.token_ids) < len(free.token_ids)


def test_stop_token_id_ends_generation_and_is_returned(gen):
    prompt = gen.tokenizer.encode("Count")
    free = gen.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    target = free.token_ids[5]
    out = gen.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[target]))[0]
    first = free.token_ids.index(target)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_max_tokens_ends_with_length(gen):
    out = gen.generate(
        [gen.tokenizer.encode("x")], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    )[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
