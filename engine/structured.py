"""Constrained decoding: grammars that decide which tokens a sequence may take next (llguidance).

A constrained request carries its grammar in ``SamplingParams.grammar``: llguidance's serialised
grammar (a JSON string, independent of the vocabulary), made from a JSON schema, a regex, a list
of choices or a Lark / GBNF grammar by ``grammar_from`` and checked against the tokenizer by
``StructuredOutputs.check`` before the request is queued. The head of a replica keeps one matcher
per constrained sequence (``Grammar``): it consumes every token the sequence takes (the generated
tokens of a resumed request are replayed through it first) and is kept across preemptions, which
recompute the same tokens. For each step's rows that sample, the matchers' token masks (one bit
per vocabulary entry) are computed on a worker thread while the forward pass runs, travel in the
step's plan, and are applied to the logits before sampling on whichever rank samples
(``engine.sampling``). A grammar that has nothing left to match but the end ends its sequence with
finish reason "stop".
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import llguidance
import llguidance.torch as llt
import torch

from engine.errors import RequestError

# JSON as the constraint writes it: no free whitespace (an untrained or unsure model could
# otherwise spend its tokens on blanks), ", " and ": " between items as people write them
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json", "regex", "choice", "grammar", "json_object")


def with_json_options(schema: dict) -> dict:
    """``schema`` with the JSON layout above, unless it sets its own (llguidance's ``x-guidance``)."""
    return schema if "x-guidance" in schema else {**schema, "x-guidance": JSON_OPTIONS}


def grammar_from(kind: str, value, param: str) -> str:
    """llguidance's grammar for a constraint of ``kind`` (``KINDS``): a JSON schema (a dict),
    a regex, a list of choices, a Lark or GBNF (EBNF) grammar, or any JSON object. Malformed
    input is a RequestError naming ``param``."""
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(with_json_options(value))
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(with_json_options({"type": "object"}))
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return llguidance.grammar_from("choice", list(value))
        if kind == "grammar":
            return llguidance.grammar_from("grammar", value)
    except ValueError as e:
        raise RequestError(f"{param}: {e}", param=param) from None
    raise ValueError(f"constraint kind must be one of {KINDS}, got {kind!r}")


def lark_json(schema: dict) -> str:
    """A JSON schema as one rule body of a Lark grammar (llguidance's ``%json``)."""
    return "%json " + json.dumps(with_json_options(schema))


class _Vocabulary:
    """The tokenizer as llguidance reads it: every id's bytes (the model's padded ids, which the
    tokenizer never produces, as empty special tokens), the special ids, and how text tokenizes."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self._tok = tokenizer
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) or b"" for i in range(n)] + [b""] * (vocab_size - n)
        self.special_token_ids = sorted(tokenizer.special_ids | set(range(n, vocab_size)))
        self.eos_token_id = min(eos_ids)
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, data: bytes) -> list[int]:
        return self._tok.encode(data.decode("utf-8", "replace"), add_special_tokens=False)


class Grammar:
    """One sequence's matcher: where it is in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def consume(self, token: int) -> bool:
        """Take a generated token; False (and ``error`` says why) when the grammar refuses it."""
        return self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """Nothing but the end is left to match."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class StructuredOutputs:
    """Grammars over one model's vocabulary: checks them, makes matchers, computes token masks.
    The llguidance tokenizer is built on first use (a constrained request's)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_ids = sorted(i for i in eos_ids if i < vocab_size)
        self._ll: llguidance.LLTokenizer | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll is None:
            if self.tokenizer is None:
                raise RequestError("constrained decoding needs the model's tokenizer", param="grammar")
            vocab = _Vocabulary(self.tokenizer, self.vocab_size, self.eos_ids)
            self._ll = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(vocab), n_vocab=self.vocab_size, eos_token=self.eos_ids
            )
        return self._ll

    def check(self, grammar: str, param: str = "grammar") -> None:
        """Raise a RequestError naming ``param`` unless ``grammar`` compiles over this vocabulary."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise RequestError(f"{param}: {error.strip()}", param=param)

    def matcher(self, grammar: str, generated: list[int] = ()) -> Grammar:
        """A matcher at the start of ``grammar``, past the tokens already ``generated``."""
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise RequestError(f"grammar: {m.get_error()}", param="grammar")
        if generated and not m.consume_tokens(list(generated)):
            raise RequestError(f"the generated tokens do not follow the grammar: {m.get_error()}")
        return Grammar(m)

    def masks(self, rows: list[tuple[int, Grammar]]) -> concurrent.futures.Future:
        """Start computing the token masks of ``rows`` ((row, grammar), one each) on a worker
        thread; the future's result is an int32 bitmask [len(rows), ceil(vocab / 32)], row i's
        bit v set when rows[i] may take token v next. llguidance releases the GIL, so this runs
        while the forward pass does."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
            self._executor = llguidance.LLExecutor(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        bitmask = torch.empty(llt.get_bitmask_shape(len(rows), self.vocab_size), dtype=torch.int32)
        matchers = [(g.matcher, i) for i, (_, g) in enumerate(rows)]

        def fill() -> torch.Tensor:
            if len(matchers) == 1:
                llt.fill_next_token_bitmask(matchers[0][0], bitmask, 0)
            else:
                llt.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
            return bitmask

        return self._pool.submit(fill)
