"""The engine's request vocabulary: what a front end hands the engine and what it gets back.

A request is a prompt of token ids and its ``SamplingParams``; ``check_request`` refuses one that
cannot run (a ``RequestError`` naming the parameter). The engine knows only token ids: text comes
in and goes out through ``engine.tokenizer`` (a ``Sequence`` decodes its own tokens with it, and
cuts its text at the request's stop strings). ``Sequence`` is the host-side state of one request
under generation; ``sampling_fields`` turns a batch of them into a plan's sampling columns. The
scheduler answers each step with ``StepOutput``s and reports its load as ``EngineStats``. Nothing
here depends on a transport (HTTP, a control stream) or on how the model runs.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.errors import RequestError
from engine.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    import torch

    from engine.structured import Grammar

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # in [-2, 2]: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # in [-2, 2]: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0: divides the logits of tokens in the prompt or output
    logprobs: int | None = None  # top log-probabilities per generated token (0..20); None: none
    grammar: str | None = None  # a constraint: llguidance's serialised grammar (engine.structured)

    @property
    def penalised(self) -> bool:
        return (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0, 0, 1)

    def validate(self, vocab_size: int) -> None:
        def bad(param, why):
            raise RequestError(f"{param} {why}", param=param)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", f"must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be an integer >= 0 (or -1 for no limit), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            bad("top_p", f"must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"must be non-empty strings, got {self.stop!r}")
        for i in self.stop_token_ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
                bad("stop_token_ids", f"must be token ids in [0, {vocab_size}), got {i!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                bad(name, f"must be a number in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
            bad("repetition_penalty", f"must be a finite number > 0, got {r!r}")
        lp = self.logprobs
        if lp is not None and (
            isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS
        ):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar):
            bad("grammar", f"must be a serialised grammar (a non-empty string), got {self.grammar!r}")
        if self.grammar is not None and self.ignore_eos:
            bad("ignore_eos", "cannot go with a constraint: a constrained output ends where its grammar does")


def check_request(prompt: list[int], params: SamplingParams, vocab_size: int, max_len: int) -> None:
    """Raise RequestError unless ``prompt`` and ``params`` can run within the vocabulary and context."""
    params.validate(vocab_size)
    if not prompt:
        raise RequestError("prompt is empty", param="prompt")
    bad = next(
        (t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size), None
    )
    if bad is not None:
        raise RequestError(
            f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})", param="prompt"
        )
    if len(prompt) + params.max_tokens > max_len:
        raise RequestError(
            f"prompt of {len(prompt)} tokens plus max_tokens={params.max_tokens} exceeds the context "
            f"length of {max_len} tokens",
            param="max_tokens" if len(prompt) < max_len else "prompt",
        )


class Sequence:
    """Host-side state of one sequence: its tokens, text, and why it finished."""

    def __init__(self, row, prompt, params: SamplingParams, eos_ids, tokenizer):
        self.row, self.prompt, self.params = row, prompt, params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.seed &= (1 << 63) - 1
        self.out: list[int] = []
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.detok = IncrementalDetokenizer(tokenizer, prompt) if tokenizer else None
        self.text = ""
        self.emitted = 0  # characters of text already handed out (text_delta)
        self.finish: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.logits: list[torch.Tensor] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # per generated token
        self.grammar: Grammar | None = None  # the constraint's matcher, where the engine keeps one

    def sampling_row(self) -> tuple[float, int, float, int, int]:
        """(temperature, top_k, top_p, seed, counter) of this sequence's next sample."""
        p = self.params
        return float(p.temperature), max(p.top_k, 0), float(p.top_p), self.seed, len(self.out)

    def append(self, token: int, context_limit: int) -> None:
        """Add a generated token; a stop token (eos, ``stop_token_ids``) ends the sequence and, as
        in vLLM, adds no text of its own. A constrained sequence also ends ("stop") when its grammar
        has nothing left to match, and fails ("error", the grammar's message as the stop reason)
        should the grammar refuse the token."""
        self.out.append(token)
        stopped = token in self.stop_ids
        ended = False
        if self.grammar is not None:
            if not self.grammar.consume(token):
                self.finish = "error"
                self.stop_reason = f"the constraint refused a token: {self.grammar.error}"
                return
            ended = not stopped and self.grammar.finished
        if self.detok is not None and not stopped:
            searched = len(self.text)
            self.text += self.detok.push(token)
            if self.params.stop and self._truncate_at_stop(searched):
                self.finish = "stop"
                return
        if stopped:
            self.finish, self.stop_reason = "stop", token
        elif ended:
            self.finish = "stop"
        elif len(self.out) >= self.params.max_tokens or len(self.prompt) + len(self.out) >= context_limit:
            self.finish = "length"
        if self.finish and self.detok is not None:
            searched = len(self.text)
            self.text += self.detok.flush()
            if self.params.stop and self._truncate_at_stop(searched):
                self.finish = "stop"

    def text_delta(self) -> str:
        """New text that can be handed out: while running, text that could still turn out to be
        the start of a stop string is held back."""
        end = len(self.text)
        if self.finish is None and self.params.stop:
            end -= max(len(s) for s in self.params.stop) - 1
        if end <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def _truncate_at_stop(self, searched: int) -> bool:
        """Cut the text at the first stop string; only text that a stop string ending in the newest
        delta can start in is searched (``searched``: the text's length before that delta)."""
        start = max(0, searched - max(len(s) for s in self.params.stop) + 1)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        at, self.stop_reason = min(hits)
        self.text = self.text[:at]
        return True


def sampling_fields(seqs: list[Sequence]) -> dict:
    """The sampling columns of a plan whose rows are ``seqs`` (``Plan(**fields, ...)``): the
    penalties and token histories only where some row has penalties, the log-probabilities to
    return as the most any row asks for."""
    temperature, top_k, top_p, seeds, counters = (list(c) for c in zip(*(s.sampling_row() for s in seqs)))
    fields = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seeds": seeds,
        "counters": counters,
    }
    asked = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
    fields["logprobs"] = max(asked) if asked else -1
    if any(s.params.penalised for s in seqs):
        fields["presence"] = [float(s.params.presence_penalty) for s in seqs]
        fields["frequency"] = [float(s.params.frequency_penalty) for s in seqs]
        fields["repetition"] = [float(s.params.repetition_penalty) for s in seqs]
        fields["prompt_lens"] = [len(s.prompt) for s in seqs]
        fields["histories"] = [s.prompt + s.out if s.params.penalised else [] for s in seqs]
    return fields


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]  # generated this step (zero or one)
    text: str  # text delta
    finish_reason: str | None  # "stop" | "length" | "abort" | "timeout" | "error" once finished
    # per token of token_ids, when the request asked: (log-probability, [(id, log-probability)])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    stop_reason: int | str | None = None  # with finish_reason "stop": the stop token id or string
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache (None: not admitted yet)


@dataclass(frozen=True)
class EngineStats:
    """An engine's load at one moment, as metrics report it."""

    running: int  # sequences in the running batch
    waiting: int  # sequences queued (new, or preempted to be recomputed)
    free_blocks: int  # KV cache blocks free
    usable_blocks: int  # KV cache blocks that can hold tokens (all but the reserved block 0)
    preemptions: int  # sequences preempted since the engine started
    cached_free_blocks: int = 0  # of free_blocks, those that still hold a cached prefix
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache since the engine started
    prefix_cache_hits: int = 0  # of those, tokens found there

    @property
    def kv_usage(self) -> float:
        """Fraction of the usable KV cache blocks in use (cached but free blocks do not count)."""
        return 1 - self.free_blocks / self.usable_blocks
