"""Batch generation in one process: prefill, then decode steps until every sequence finishes.

``Generator.generate`` takes token-id prompts and per-prompt ``SamplingParams`` and returns one
``Completion`` each. Prompts of different lengths prefill together (right-padded, each row with its
own positions), then decode together; a finished row drops out of the batch at once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.compiled import resolve_decode_mode
from engine.config import ModelConfig
from engine.executor import LocalExecutor, Plan
from engine.loader import Checkpoint, build_model
from engine.model import CausalLM
from engine.request import SamplingParams, Sequence, check_request, sampling_fields
from engine.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Completion:
    """One prompt's result from ``Generator.generate``."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"
    seed: int
    logits: list[torch.Tensor] | None = None  # per generated token, when recorded
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per generated token


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
        decode_mode: str = "eager",
    ) -> Generator:
        """Load ``model_dir`` in this process. ``decode_mode`` "compiled" runs the decode steps
        through ``torch.compile`` (``engine.compiled``), each batch size the first time it is
        seen (a batch shrinks as its sequences finish); "auto": compiled on a GPU."""
        where = torch.device(device)
        mode = resolve_decode_mode(decode_mode, where)
        config = ModelConfig.from_hf(model_dir)
        checkpoint = Checkpoint(model_dir)
        tokenizer = load_tokenizer(model_dir, config.vocab_size) if with_tokenizer else None
        model = build_model(config, checkpoint, where, dtype, max_len, progress=progress, quantize=quantize)
        return cls(model, tokenizer, where, LocalExecutor(model, where, mode))

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
