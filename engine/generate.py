"""Batch generation in one process: prefill, then decode steps until every sequence finishes.

``Generator.generate`` takes token-id prompts and per-prompt ``SamplingParams`` and returns one
``Completion`` each. Prompts of different lengths prefill together (right-padded, each row with its
own positions), then decode together; a finished row drops out of the batch at once.
"""

from __future__ import annotations

import collections
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import ModelConfig, resolve_dtype
from engine.errors import RequestError
from engine.executor import LocalExecutor, Plan
from engine.loader import Checkpoint, load_weights
from engine.model import CausalLM
from engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

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


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"
    seed: int
    logits: list[torch.Tensor] | None = None  # per generated token, when recorded
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per generated token


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
        self.logits: list[torch.Tensor] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # per generated token

    def sampling_row(self) -> tuple[float, int, float, int, int]:
        """(temperature, top_k, top_p, seed, counter) of this sequence's next sample."""
        p = self.params
        return float(p.temperature), max(p.top_k, 0), float(p.top_p), self.seed, len(self.out)

    def append(self, token: int, context_limit: int) -> None:
        """Add a generated token; a stop token (eos, ``stop_token_ids``) ends the sequence and, as
        in vLLM, adds no text of its own."""
        self.out.append(token)
        stopped = token in self.stop_ids
        if self.detok is not None and not stopped:
            searched = len(self.text)
            self.text += self.detok.push(token)
            if self.params.stop and self._truncate_at_stop(searched):
                self.finish = "stop"
                return
        if stopped:
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
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
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


class Generator:
    """The generation loop over an executor: the model in this process (``from_pretrained``) or a
    replica spread over ranks (``engine.replica``).

    With ``micro_batches`` > 1 (a pipeline's stage count) the batch is split into up to that many
    groups in flight at once, so that the stages work at the same time; but only into groups of at
    least ``min_micro_batch_rows`` sequences, because a decode pass over a few rows costs about as
    much as over many (it is bound by reading the weights), and splitting a small batch would
    multiply that cost by more than the overlap saves (BENCHMARKS.md).
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device = "cpu",
        executor=None,
        micro_batches: int = 1,
        min_micro_batch_rows: int = 32,
    ):
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.executor = executor or LocalExecutor(model, self.device)
        self.micro_batches = micro_batches
        self.min_micro_batch_rows = min_micro_batch_rows
        self.max_len = model.rotary.max_len
        self.windows = set(self.config.sliding_windows)
        self.eos_ids = set(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
        progress: bool = False,
        with_tokenizer: bool = True,
        quantize: str | None = None,
    ) -> Generator:
        config = ModelConfig.from_hf(model_dir)
        checkpoint = Checkpoint(model_dir)
        tokenizer = load_tokenizer(model_dir, config.vocab_size) if with_tokenizer else None
        model = build_model(
            config, checkpoint, torch.device(device), dtype, max_len, progress=progress, quantize=quantize
        )
        return cls(model, tokenizer, device)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        record_logits: bool = False,
    ) -> list[Completion]:
        """Complete every prompt; ``record_logits`` keeps each step's full logits (for checks)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for prompt, p in zip(prompts, params):
            check_request(prompt, p, self.config.vocab_size, self.max_len)
        if not prompts:
            return []
        seqs = [
            Sequence(i, list(p), sp, self.eos_ids, self.tokenizer)
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        self.executor.begin(len(seqs), max(len(s.prompt) + s.params.max_tokens for s in seqs))
        n = len(seqs)
        m = max(1, min(self.micro_batches, n // max(1, self.min_micro_batch_rows)))
        groups = [seqs[i * n // m : (i + 1) * n // m] for i in range(m)]
        inflight = collections.deque()
        for mb, group in enumerate(groups):
            self.executor.submit(self._plan(mb, group, prefill=True, record=record_logits))
            inflight.append((mb, group))
        while inflight:
            mb, group = inflight.popleft()
            sampled = self.executor.result(mb)
            for i, (s, t) in enumerate(zip(group, sampled.ids)):
                if sampled.logits is not None:
                    s.logits.append(sampled.logits[i].cpu())
                if sampled.logprobs is not None and s.params.logprobs is not None:
                    s.logprobs.append(sampled.row_logprobs(i, s.params.logprobs))
                s.append(t, self.max_len)
            group = [s for s in group if s.finish is None]
            if group:
                self.executor.submit(self._plan(mb, group, prefill=False, record=record_logits))
                inflight.append((mb, group))
        return [
            Completion(
                s.prompt,
                s.out,
                s.text if s.detok else None,
                s.finish,
                s.seed,
                s.logits or None,
                s.logprobs or None,
            )
            for s in seqs
        ]

    def close(self) -> None:
        """Release the executor (on a multi-rank replica: tell the other ranks to exit)."""
        self.executor.shutdown()

    @staticmethod
    def _plan(mb: int, seqs: list[Sequence], prefill: bool, record: bool) -> Plan:
        if prefill:
            width = max(len(s.prompt) for s in seqs)
            tokens = [s.prompt + [0] * (width - len(s.prompt)) for s in seqs]
            starts = [0] * len(seqs)
            index = [len(s.prompt) - 1 for s in seqs]
        else:
            tokens = [[s.out[-1]] for s in seqs]
            starts = [len(s.prompt) + len(s.out) - 1 for s in seqs]
            index = [0] * len(seqs)
        return Plan(
            mb=mb,
            tokens=tokens,
            starts=starts,
            rows=[s.row for s in seqs],
            logit_index=index,
            record_logits=record,
            **sampling_fields(seqs),
        )


def build_model(
    config: ModelConfig,
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype | str | None = None,
    max_len: int | None = None,
    layer_ids: list[int] | None = None,
    first: bool = True,
    last: bool = True,
    tp=None,
    progress: bool = False,
    quantize: str | None = None,
) -> CausalLM:
    """A model (or one stage/shard of it) with its weights read from ``checkpoint``, in ``dtype``
    (a torch dtype, a ``--dtype`` name, or None for ``auto``: see ``engine.config.resolve_dtype``);
    with ``quantize`` ("int8"), its projections quantized once read (``engine.quant``)."""
    dtype = resolve_dtype(dtype, config, device)
    max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
    with torch.device("meta"):
        model = CausalLM(config, max_len=max_len, layer_ids=layer_ids, first=first, last=last, tp=tp)
    model.to(dtype)
    load_weights(model, checkpoint, device=device, progress=progress)
    model.rotary.build(device, dtype)
    if quantize:
        from engine.quant import quantize as quantize_model

        quantize_model(model, quantize)
    return model.eval()
