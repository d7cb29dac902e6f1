"""A Hugging Face directory with only tokenizer.json, served as the README shows.

A tiny random Llama with a Llama-3-style byte-level tokenizer (and a padded embedding), served by
``./launch.sh serve``: its greedy text through the openai client equals transformers' ``generate``,
it stops at every eos id of generation_config.json, chat prompts are the tokens of
``apply_chat_template``, and ``/tokenize`` equals ``AutoTokenizer``.
"""

import json

import openai
import pytest
import torch
from hf_models import make_hf_model
from servers import LaunchedServer, post_json

from server.testing.hf_tokenizers import check_text_offsets, write_llama3_tokenizer

PROMPTS = ["The quick brown fox", "def add(a, b):", "数字 12345 和", "Once upon a time 🎉"]
NEW_TOKENS = 24
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour <|eot_id|> please"},
]


def _hf_greedy(model, ids: list[int], eos: list[int] | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def _choose_eos(outputs: list[list[int]]) -> list[int]:
    """Three ids such that each is the first of the three in some output, so that every one of
    them ends a request."""
    firsts = []
    for out in outputs:
        for token in out[3:]:
            if token not in firsts and all(
                token not in o[: o.index(f)] for o in outputs for f in firsts if f in o
            ):
                firsts.append(token)
                break
    if len(firsts) < 3:  # fewer distinct first tokens than prompts: any ids late in the outputs
        firsts += [t for t in outputs[0][::-1] if t not in firsts][: 3 - len(firsts)]
    return firsts[:3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    path = write_llama3_tokenizer(tmp_path_factory.mktemp("hf") / "llama3-json", vocab_size=600)
    tok = AutoTokenizer.from_pretrained(path)
    model = make_hf_model("llama", vocab_size=len(tok) + 7)  # an embedding padded past the vocabulary
    model.save_pretrained(path)
    assert not (path / "tokenizer.model").exists()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    chat = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    free = [_hf_greedy(model, ids, None) for ids in [*prompts, chat]]
    eos = _choose_eos(free)
    generation = json.loads((path / "generation_config.json").read_text())
    generation.update(eos_token_id=eos, temperature=0.6, top_p=0.9)
    (path / "generation_config.json").write_text(json.dumps(generation))
    expected = [_hf_greedy(model, ids, eos) for ids in [*prompts, chat]]
    return path, tok, eos, prompts, chat, expected


@pytest.fixture(scope="module")
def server(checkpoint):
    path = checkpoint[0]
    server = LaunchedServer("--model", str(path), "--threads", "1", "--kv-cache-mib", "8")
    yield server
    server.kill()


def _expected_text(tok, ids: list[int], eos: list[int]) -> tuple[str, str]:
    stopped = bool(ids) and ids[-1] in eos and len(ids) <= NEW_TOKENS
    return tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=True), "stop" if stopped else "length"


def test_start_up_names_the_tokenizer_stop_ids_and_defaults(server, checkpoint):
    _, _, eos, *_ = checkpoint
    line = next(line for line in server.lines if "tokenizer" in line and "stop ids" in line)
    assert "tokenizers" in line and "tokenizer.json" in line
    assert all(str(i) in line for i in eos)
    assert "temperature=0.6" in line and "top_p=0.9" in line


def test_greedy_completions_equal_transformers_and_stop_at_every_eos_id(server, checkpoint):
    _, tok, eos, prompts, _, expected = checkpoint
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    reasons = []
    for text, hf_ids in zip(PROMPTS, expected):
        got = client.completions.create(
            model="llama3-json", prompt=text, max_tokens=NEW_TOKENS, temperature=0
        )
        want_text, want_reason = _expected_text(tok, hf_ids, eos)
        assert got.choices[0].text == want_text
        assert got.choices[0].finish_reason == want_reason
        assert got.usage.completion_tokens == len(hf_ids)
        streamed = client.completions.create(
            model="llama3-json", prompt=text, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == want_text
        reasons.append(hf_ids[-1] if want_reason == "stop" else None)
    chat_ids = expected[-1]
    got = client.chat.completions.create(
        model="llama3-json", messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0
    )
    want_text, want_reason = _expected_text(tok, chat_ids, eos)
    assert got.choices[0].message.content == want_text
    assert got.choices[0].finish_reason == want_reason
    reasons.append(chat_ids[-1] if want_reason == "stop" else None)
    # every eos id of generation_config.json ended one of the requests
    assert set(eos) <= set(reasons), (eos, reasons)


def test_tokenize_equals_autotokenizer(server, checkpoint):
    _, tok, _, prompts, chat, _ = checkpoint
    for text, ids in zip(PROMPTS, prompts):
        code, body = post_json(server.base, "/tokenize", {"prompt": text})
        assert code == 200 and body["tokens"] == ids and body["count"] == len(ids)
        assert body["max_model_len"] > 0
        code, body = post_json(server.base, "/tokenize", {"prompt": text, "add_special_tokens": False})
        assert body["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
        code, body = post_json(server.base, "/detokenize", {"tokens": ids})
        assert code == 200 and body["prompt"] == tok.decode(ids, skip_special_tokens=True)
    code, body = post_json(server.base, "/tokenize", {"messages": MESSAGES})
    assert code == 200 and body["tokens"] == chat
    no_prompt = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=False, tokenize=True, return_dict=False
    )
    code, body = post_json(server.base, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert body["tokens"] == no_prompt


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ("/tokenize", {"prompt": "a", "extra": 1}, "extra"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/v1/completions", {"prompt": "a", "stop": ["<|im_end|>"]}, "stop"),
    ],
)
def test_bad_tokenize_and_stop_input_is_400(server, route, body, param):
    code, answer = post_json(server.base, route, body)
    assert code == 400, answer
    assert answer["error"]["param"] == param
    if param == "stop":
        assert "tokenizer.json" in answer["error"]["message"]


def test_a_special_token_stop_string_becomes_its_stop_id(checkpoint):
    from engine.tokenizer import load_tokenizer
    from server.protocol import stops

    path, tok, *_ = checkpoint
    ours = load_tokenizer(path)
    # '<|eot_id|>' decodes to no text, so as a stop string it could never match: it stops on its id
    strings, ids = stops({"stop": ["<|eot_id|>", "fox"], "stop_token_ids": [5]}, ours)
    assert strings == ["fox"] and ids == [5, tok.convert_tokens_to_ids("<|eot_id|>")]


def test_generation_config_defaults_fill_only_what_a_request_leaves_out(checkpoint):
    from engine.config import GenerationConfig
    from server.protocol import sampling

    defaults = GenerationConfig.from_hf(checkpoint[0]).defaults
    assert defaults == {"temperature": 0.6, "top_p": 0.9}
    params, _ = sampling({"top_k": 5}, False, None, defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.9, 5)
    params, _ = sampling({"temperature": 0, "top_p": 1}, False, None, defaults)
    assert (params.temperature, params.top_p) == (0, 1)
    params, _ = sampling({}, False, None, {})  # --generation-config none
    assert (params.temperature, params.top_p, params.repetition_penalty) == (1.0, 1.0, 1.0)


def _token_bytes_oracle(tok, token_id: int) -> bytes | None:
    """A token's bytes from transformers' own token string (byte-level: GPT-2's table)."""
    from test_hf_tokenizer import _bytes_to_unicode

    if token_id >= len(tok):
        return None
    if token_id in tok.added_tokens_decoder:
        return tok.added_tokens_decoder[token_id].content.encode()
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    return bytes(byte_of[c] for c in tok.convert_ids_to_tokens(token_id))


def test_logprobs_name_every_entry_index_the_text_and_carry_the_real_bytes(server, checkpoint):
    _, tok, *_ = checkpoint
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    partial = past_vocab = False
    for text in PROMPTS:
        kwargs = dict(model="llama3-json", prompt=text, max_tokens=NEW_TOKENS, temperature=0, logprobs=20)
        got = client.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0]
        as_ids = client.completions.create(
            **kwargs, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}
        ).choices[0]
        ids = [int(t.removeprefix("token_id:")) for t in as_ids.logprobs.tokens]
        assert as_ids.text == got.text and len(ids) == NEW_TOKENS
        lp = got.logprobs
        # every one of the 20 entries is there, each under a name of its own
        assert all(len(top) == 20 for top in lp.top_logprobs)
        past_vocab |= any(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
        for token_id, name in zip(ids, lp.tokens):
            data = _token_bytes_oracle(tok, token_id)
            try:
                assert name == data.decode()
            except UnicodeDecodeError:
                partial = True
                assert name == "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        check_text_offsets(tok.decode, got.text, ids, lp.text_offset)
        chat = client.chat.completions.create(
            model="llama3-json",
            messages=[{"role": "user", "content": text}],
            max_tokens=NEW_TOKENS,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body={"ignore_eos": True},
        ).choices[0]
        specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        entries = [e for e in chat.logprobs.content if e.token not in specials]  # decoding skips those
        # the bytes rebuild the text, as transformers writes bytes that form no character
        assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == chat.message.content
    # the random model produces both cases, so that the checks above meet them
    assert partial and past_vocab


def test_usage_counts_each_prompt_once_whatever_n(server, checkpoint):
    _, tok, _, prompts, *_ = checkpoint
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    got = client.completions.create(
        model="llama3-json", prompt=PROMPTS[0], max_tokens=2, n=3, extra_body={"ignore_eos": True}
    )
    assert got.usage.prompt_tokens == len(prompts[0]) and got.usage.completion_tokens == 6
    got = client.completions.create(model="llama3-json", prompt=PROMPTS[:2], max_tokens=2, n=2)
    assert got.usage.prompt_tokens == len(prompts[0]) + len(prompts[1])
    chunks = list(
        client.completions.create(
            model="llama3-json",
            prompt=PROMPTS[:2],
            max_tokens=2,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens == len(prompts[0]) + len(prompts[1])
    model = client.models.list().data[0]
    assert isinstance(model.created, int) and model.created > 1_700_000_000
