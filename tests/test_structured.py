"""Constrained decoding (engine/structured.py) on a random-weight model, whose outputs parse only
because the grammar makes them: JSON schemas (OpenAI's response_format, pydantic models through
the openai client's ``parse``, vLLM's structured_outputs), regex, choice and EBNF grammars, at
temperatures 0 and 1; the same in a batch that requests join, after preemptions, resumed from
generated tokens, through compiled decoding and on a tp = 2 replica; bad constraints are 400s."""

import concurrent.futures
import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from servers import LaunchedServer, app_in_thread, post_json

from engine.errors import RequestError
from engine.executor import Plan
from engine.generate import Generator
from engine.request import SamplingParams
from engine.sampling import SamplingBatch, sample
from engine.scheduler import Engine, drain
from engine.structured import grammar_from
from server.app import create_app
from server.state import ServerConfig

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "name": {"type": "string", "maxLength": 6},
                },
                "required": ["id", "name"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["colors", "size"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            # a bounded number needs a bounded fraction too, or an untrained model's digits run on
            "score": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.5},
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["score", "count"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 5},
            "note": {"type": "string", "maxLength": 4},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
}
SCHEMA = SCHEMAS["nested"]
MESSAGES = [{"role": "user", "content": "Describe a user as JSON."}]


@pytest.fixture(scope="module")
def gen(tiny_demo):
    return Generator.from_pretrained(tiny_demo)


@pytest.fixture(scope="module")
def server(gen):
    engine = Engine.for_model(gen.model, 256, 8, gen.tokenizer, max_batched_tokens=128)
    with app_in_thread(create_app(engine, ServerConfig(model_name="tiny"))) as (base, _):
        yield base


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _engine(gen, blocks=256, **kw) -> Engine:
    return Engine.for_model(gen.model, blocks, 8, gen.tokenizer, max_batched_tokens=128, **kw)


def _texts(results) -> dict[str, tuple[str, str, list[int]]]:
    return {
        rid: ("".join(o.text for o in outs), outs[-1].finish_reason, [t for o in outs for t in o.token_ids])
        for rid, outs in results.items()
    }


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_validates_against_its_schema(client, name):
    schema = SCHEMAS[name]
    for temperature in (0, 1):
        out = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_completion_tokens=96,
            temperature=temperature,
            seed=3,
            n=3,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
        )
        for choice in out.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)


class Address(BaseModel):
    city: str = Field(max_length=8)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    address: Address
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


def test_pydantic_models_parse_through_the_openai_client(client):
    for temperature, seed in ((0, None), (1, 1), (1, 2)):
        out = client.chat.completions.parse(
            model="tiny",
            messages=MESSAGES,
            response_format=Person,
            max_completion_tokens=120,
            temperature=temperature,
            seed=seed,
        )
        person = out.choices[0].message.parsed
        assert isinstance(person, Person) and re.fullmatch(r"[0-9]{5}", person.address.zip)
        assert out.choices[0].finish_reason == "stop"


def test_regex_choice_and_grammar_outputs_match(client):
    kinds = {
        "regex": (r"[0-9]{3}-[a-z]{2,4}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        "choice": (["yes", "no", "maybe so"], lambda t: t in ("yes", "no", "maybe so")),
        "grammar": (
            'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] | "1" [0-9]',
            lambda t: re.fullmatch(r"\((1?[0-9])( \+ 1?[0-9])*\)", t),
        ),
    }
    for kind, (spec, matches) in kinds.items():
        for temperature in (0, 1):
            out = client.completions.create(
                model="tiny",
                prompt="Say",
                max_tokens=40,
                temperature=temperature,
                n=3,
                seed=5,
                extra_body={"structured_outputs": {kind: spec}},
            )
            for choice in out.choices:
                assert choice.finish_reason == "stop" and matches(choice.text), (kind, choice.text)


def test_json_object_outputs_are_objects_and_a_short_budget_ends_with_length(client):
    stopped = 0
    for seed in range(4):
        out = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_completion_tokens=64,
            temperature=1,
            seed=seed,
            response_format={"type": "json_object"},
        )
        choice = out.choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"
    assert stopped >= 1
    short = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_completion_tokens=4,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4


def test_streamed_constrained_text_equals_the_whole_answer(client):
    kwargs = dict(
        model="tiny",
        messages=MESSAGES,
        max_completion_tokens=96,
        temperature=1,
        seed=11,
        extra_body={"structured_outputs": {"json": json.dumps(SCHEMA)}},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
         "response_format.json_schema.strict"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": 'root ::= ( "a" '}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "structured_outputs"),
        ({"structured_outputs": {"regex": "a+"}, "ignore_eos": True}, "ignore_eos"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400s_that_name_the_field(server, body, param):
    status, answer = post_json(server, "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer


def test_a_schema_that_fails_fails_only_its_request(server):
    good = {
        "messages": MESSAGES,
        "max_tokens": 96,
        "response_format": {"type": "json_object"},
        "temperature": 0,
    }
    bad = {
        "messages": MESSAGES,
        "structured_outputs": {"json": {"type": "string", "format": "no-such-format"}},
    }
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post_json, server, "/v1/chat/completions", b) for b in (good, bad) * 3]
        answers = [f.result() for f in futures]
    for i, (status, answer) in enumerate(answers):
        if i % 2:
            assert status == 400 and answer["error"]["param"] == "structured_outputs.json"
            assert "no-such-format" in answer["error"]["message"]
        else:
            assert status == 200 and answer["choices"][0]["message"]["content"].startswith("{")


def test_requests_joining_mid_batch_and_unconstrained_rows_are_unchanged(gen):
    prompt = gen.tokenizer.encode("The leader")
    free = SamplingParams(max_tokens=40, temperature=1, seed=7, ignore_eos=True)
    alone = _engine(gen)
    alone.add_request("free", prompt, free)
    want = _texts(drain(alone))["free"]

    engine = _engine(gen)
    engine.add_request("free", prompt, free)
    early = [t for _ in range(5) for o in engine.step() for t in o.token_ids]
    grammar = grammar_from("json", SCHEMA, "schema")
    for i in range(4):
        engine.add_request(
            f"json-{i}", prompt, SamplingParams(max_tokens=96, temperature=i % 2, seed=i, grammar=grammar)
        )
    results = drain(engine)
    got = _texts({k: v for k, v in results.items() if k != "free"})
    first = early + [t for o in results["free"] for t in o.token_ids]
    assert first == want[2]  # a constrained row beside it changes nothing of its tokens
    for text, reason, _ in got.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_preempted_constrained_sequences_draw_the_same_tokens(gen):
    prompt = gen.tokenizer.encode("Once")
    grammar = grammar_from("json", SCHEMAS["optional_fields"], "schema")

    def run(blocks):
        engine = _engine(gen, blocks)
        for i in range(6):
            engine.add_request(
                f"r{i}", prompt, SamplingParams(max_tokens=40, temperature=1, seed=i, grammar=grammar)
            )
        return _texts(drain(engine)), engine.stats().preemptions

    roomy, none = run(256)
    tight, preempted = run(12)
    assert none == 0 and preempted > 0
    assert tight == roomy
    for text, reason, _ in tight.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS["optional_fields"])


def test_a_resumed_request_replays_its_tokens_through_the_grammar(gen):
    prompt = gen.tokenizer.encode("Resume")
    params = SamplingParams(
        max_tokens=96, temperature=1, seed=4, grammar=grammar_from("json", SCHEMA, "schema")
    )
    engine = _engine(gen)
    engine.add_request("whole", prompt, params)
    text, reason, tokens = _texts(drain(engine))["whole"]
    assert reason == "stop"
    k = len(tokens) // 2
    engine.add_request("rest", prompt, params, generated=tokens[:k])
    rest_text, rest_reason, rest = _texts(drain(engine))["rest"]
    assert rest == tokens[k:] and rest_reason == "stop"
    assert text.endswith(rest_text) and gen.tokenizer.decode(tokens[:k]) + rest_text == text
    off_grammar = gen.tokenizer.encode("plain words")
    with pytest.raises(RequestError, match="do not follow the grammar"):
        engine.add_request("bad", prompt, params, generated=off_grammar)


def test_compiled_decoding_applies_the_same_masks(gen):
    prompt = gen.tokenizer.encode("Compiled")
    grammar = grammar_from("json", SCHEMAS["array_enum"], "schema")
    results = []
    for mode in ("eager", "compiled"):
        engine = _engine(gen, decode_mode=mode, max_running=1)  # one bucket to compile
        for i in range(2):
            engine.add_request(
                f"r{i}", prompt, SamplingParams(max_tokens=40, temperature=1, seed=i, grammar=grammar)
            )
        results.append(_texts(drain(engine)))
        if mode == "compiled":
            assert sum(engine.executor.compiled.steps.values()) > 0
    assert results[0] == results[1]
    for text, reason, _ in results[1].values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS["array_enum"])


def test_masks_travel_in_the_plan_and_leave_only_allowed_tokens():
    masks = torch.zeros(2, 2, dtype=torch.int32)
    masks[0, 0] = 1 << 5  # row 1 may take token 5 only
    masks[1, 1] = (1 << 3) | (1 << 4)  # row 2 may take 35 or 36
    plan = Plan(tokens=[[1], [2], [3]], starts=[0, 0, 0], temperature=[0.0, 1.0, 1.0], top_k=[0, 0, 0],
                top_p=[1.0, 1.0, 1.0], seeds=[1, 2, 3], counters=[0, 0, 0], mask_rows=[1, 2],
                masks=masks)  # fmt: skip
    back = Plan.decode(*plan.encode())
    assert back.mask_rows == [1, 2] and torch.equal(back.masks, masks)
    logits = torch.randn(3, 40)
    for counter in range(5):
        batch = back.sampling("cpu")
        batch.counters.fill_(counter)
        ids = sample(logits, batch).tolist()
        assert ids[0] == logits[0].argmax() and ids[1] == 5 and ids[2] in (35, 36)
    unconstrained = SamplingBatch.build([0.0], [0], [1.0], [0], [0], "cpu")
    assert sample(logits[:1], unconstrained).tolist() == [logits[0].argmax()]


@pytest.fixture(scope="module")
def tp2(tiny_demo):
    server = LaunchedServer(
        "--model", str(tiny_demo), "--tp", "2", "--threads", "1", "--kv-cache-mib", "4",
        "--max-batched-tokens", "64",
    )  # fmt: skip
    yield server
    server.kill()


def test_tp2_constrained_outputs_validate_and_equal_one_process(tp2, client):
    remote = openai.OpenAI(base_url=tp2.base + "/v1", api_key="unused", max_retries=0)
    rf = {"type": "json_schema", "json_schema": {"name": "nested", "schema": SCHEMA}}
    kwargs = dict(messages=MESSAGES, max_completion_tokens=96, response_format=rf)

    def ask(c, temperature, seed):
        return c.chat.completions.create(model="tiny", temperature=temperature, seed=seed, n=2, **kwargs)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # requests join each other's batches
        futures = [pool.submit(ask, remote, t, s) for t in (0, 1) for s in (1, 2)]
        answers = [f.result() for f in futures]
    for out in answers:
        for choice in out.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    here = ask(client, 0, 1)
    assert [c.message.content for c in answers[0].choices] == [c.message.content for c in here.choices]
    regex = remote.completions.create(
        model="tiny", prompt="Code", max_tokens=20, temperature=1, seed=2,
        extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2,3}"}},
    )  # fmt: skip
    assert re.fullmatch("[A-Z]{2}[0-9]{2,3}", regex.choices[0].text)
