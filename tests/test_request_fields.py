"""Request fields that change the output, each through the real app (server.app.create_app on a
socket) and checked for its effect, not only for being accepted: stop, stop_token_ids, top_k=1,
a tiny top_p, presence_penalty (against transformers' logits plus the OpenAI rule), priority,
max_completion_tokens, the seed + i rule for n > 1, and a non-empty suffix refused."""

import threading
import time

import pytest
import torch
from servers import app_in_thread, post_json

from engine.generate import Generator
from engine.request import SamplingParams
from engine.scheduler import Engine
from server.app import create_app
from server.state import ServerConfig

PROMPT = "The leader sends heartbeats to"


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


@pytest.fixture(scope="module")
def base(gen):
    engine = Engine.for_model(gen.model, 128, 8, gen.tokenizer, max_batched_tokens=64)
    with app_in_thread(create_app(engine, ServerConfig(model_name="tiny", max_queue=64))) as (url, _):
        yield url


def _complete(base, **body):
    status, answer = post_json(base, "/v1/completions", {"prompt": PROMPT, **body})
    assert status == 200, answer
    return answer


def _greedy(gen, max_tokens=16, **kw):
    ids = gen.tokenizer.encode(PROMPT)
    return gen.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw))[0]


def test_stop_string_ends_the_text_before_it(base, gen):
    full = _greedy(gen, 24)
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and len(stop) == 3, text
    cut = text[: text.find(stop)]
    got = _complete(base, max_tokens=24, temperature=0, ignore_eos=True, stop=stop)["choices"][0]
    assert got["text"] == cut and got["finish_reason"] == "stop"
    plain = _complete(base, max_tokens=24, temperature=0, ignore_eos=True)["choices"][0]
    assert plain["text"] == text and plain["finish_reason"] == "length"


def test_stop_token_ids_end_the_completion_at_that_token(base, gen):
    full = _greedy(gen, 16)
    k = 5
    token = full.token_ids[k]
    first = full.token_ids.index(token)  # the first time it is generated
    got = _complete(base, max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[token])
    assert got["usage"]["completion_tokens"] == first + 1  # the stop token counts, adds no text
    assert got["choices"][0]["finish_reason"] == "stop"
    assert got["choices"][0]["text"] == gen.tokenizer.decode(full.token_ids[:first])


@pytest.mark.parametrize("field", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_1_and_a_tiny_top_p_are_greedy_at_temperature_1_for_any_seed(base, gen, field):
    greedy = _greedy(gen, 12).text
    sampled = [
        _complete(base, max_tokens=12, temperature=1.0, ignore_eos=True, seed=s, **field)["choices"][0][
            "text"
        ]
        for s in range(4)
    ]
    assert sampled == [greedy] * 4
    # the same seeds without the field do sample (so the equality above is the field's doing)
    free = [
        _complete(base, max_tokens=12, temperature=1.0, ignore_eos=True, seed=s)["choices"][0]["text"]
        for s in range(4)
    ]
    assert any(t != greedy for t in free)


@torch.inference_mode()
def test_presence_penalty_is_transformers_logits_minus_the_penalty_on_generated_tokens(base, gen, tiny_demo):
    """The oracle: transformers' logits for the text so far, minus ``presence_penalty`` once for
    every distinct token already generated (not the prompt's: the OpenAI rule), then argmax."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32).eval()
    prompt = gen.tokenizer.encode(PROMPT)
    penalty, steps = 1.5, 16

    def oracle(p):
        ids, out = list(prompt), []
        for _ in range(steps):
            logits = hf(torch.tensor([ids])).logits[0, -1].clone()
            for t in set(out):
                logits[t] -= p
            out.append(int(logits.argmax()))
            ids.append(out[-1])
        return out

    plain, penalised = oracle(0.0), oracle(penalty)
    assert plain != penalised  # the penalty matters for this prompt
    assert len(set(penalised)) > len(set(plain))  # it pushes towards tokens not yet generated
    assert _greedy(gen, steps).token_ids == plain
    assert _greedy(gen, steps, presence_penalty=penalty).token_ids == penalised
    got = _complete(
        base, max_tokens=steps, temperature=0, ignore_eos=True, presence_penalty=penalty, logprobs=0
    )
    choice = got["choices"][0]
    assert choice["text"] == gen.tokenizer.decode(penalised)
    assert choice["logprobs"]["tokens"] == [gen.tokenizer.token_text(t) for t in penalised]


def test_max_completion_tokens_caps_a_chat_answer(base, gen):
    from server.chat import ChatFormatter

    messages = [{"role": "user", "content": "Tell me about heartbeats"}]
    body = {"messages": messages, "temperature": 0, "ignore_eos": True}
    status, got = post_json(base, "/v1/chat/completions", {**body, "max_completion_tokens": 3})
    assert status == 200, got
    assert got["usage"]["completion_tokens"] == 3 and got["choices"][0]["finish_reason"] == "length"
    prompt = ChatFormatter(gen.tokenizer).prompt_ids(messages)
    ref = gen.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert got["choices"][0]["message"]["content"] == ref.text
    status, longer = post_json(base, "/v1/chat/completions", {**body, "max_completion_tokens": 7})
    assert longer["usage"]["completion_tokens"] == 7


def test_choice_i_of_n_is_the_single_request_with_seed_plus_i(base):
    many = _complete(base, max_tokens=10, temperature=1.0, ignore_eos=True, seed=40, n=3)["choices"]
    assert [c["index"] for c in many] == [0, 1, 2]
    singles = [
        _complete(base, max_tokens=10, temperature=1.0, ignore_eos=True, seed=40 + i)["choices"][0]["text"]
        for i in range(3)
    ]
    assert [c["text"] for c in many] == singles
    assert len(set(singles)) > 1  # the seeds do draw different samples


def test_a_non_empty_suffix_is_refused(base):
    status, got = post_json(base, "/v1/completions", {"prompt": PROMPT, "suffix": "and then?"})
    assert status == 400 and got["error"]["param"] == "suffix"
    assert post_json(base, "/v1/completions", {"prompt": PROMPT, "suffix": "", "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("high", [5, 0])
def test_a_higher_priority_request_queued_behind_a_full_batch_starts_first(gen, high):
    """max_running=1: while one long request runs, a low-priority request and then a high-priority
    one queue; the high one is admitted first and so, alone in the batch, finishes first. With
    equal priorities (high=0) the order is first come, first served."""
    engine = Engine.for_model(gen.model, 128, 8, gen.tokenizer, max_running=1)
    done: list[str] = []

    def ask(name, body):
        status, _ = post_json(
            url, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "ignore_eos": True, **body}
        )
        assert status == 200
        done.append(name)

    with app_in_thread(create_app(engine, ServerConfig(model_name="tiny"))) as (url, _):
        threads = [threading.Thread(target=ask, args=("long", {"max_tokens": 300}))]
        threads[0].start()
        while not engine.running:
            time.sleep(0.005)
        for name, priority in (("low", 0), ("high", high)):
            threads.append(threading.Thread(target=ask, args=(name, {"max_tokens": 4, "priority": priority})))
            threads[-1].start()
            while len(engine.waiting) < len(threads) - 1:
                time.sleep(0.005)
        assert len(engine.running) == 1 and len(engine.waiting) == 2  # both queued behind the long one
        for t in threads:
            t.join(timeout=60)
    assert done == (["long", "high", "low"] if high else ["long", "low", "high"])
