"""Continuous batching over a paged KV cache: requests join and leave the running batch every step.

Each ``Engine.step``:

1. decode: every running sequence whose prompt is cached gets one token. A sequence that needs a
   new block and finds none free preempts the lowest-priority, newest running sequence, whose
   blocks go back to the pool and which waits again at the head of its priority to be recomputed
   (prompt plus the tokens it already has);
2. prefill: waiting sequences, higher priority first and first come first served within one, are
   admitted while there are free blocks, running slots and step tokens left; a long prompt is
   prefilled in chunks of what the step's token budget leaves after the decodes, so that it never
   stalls the running sequences for more than one step's budget.

Decode rows and prefill chunks run as two forward passes of one step. Sampling is counter-based
(``engine.sampling``), so a recomputed sequence draws exactly the tokens it would have drawn.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass

import torch

from engine.errors import RequestError
from engine.generate import SamplingParams, Sequence, check_request
from engine.kv_cache import PagedKVCache, make_step
from engine.model import CausalLM
from engine.sampling import SamplingBatch, sample
from engine.tokenizer import Tokenizer


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]  # generated this step (zero or one)
    text: str  # text delta
    finish_reason: str | None  # "stop" | "length" | "abort" once finished


class _Seq(Sequence):
    """A sequence under the scheduler: its priority, arrival order, cache blocks and how many of
    its tokens are in them."""

    def __init__(self, request_id, prompt, params, priority, arrival, eos_ids, tokenizer):
        super().__init__(0, prompt, params, eos_ids, tokenizer)
        self.request_id, self.priority, self.arrival = request_id, priority, arrival
        self.blocks: list[int] = []
        self.cached = 0  # tokens whose keys and values are in the cache
        self.emitted = 0  # characters of text already handed out

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def prefilled(self) -> bool:
        return bool(self.out) and self.cached >= len(self.prompt) + len(self.out) - 1

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


class Engine:
    def __init__(
        self,
        model: CausalLM,
        cache: PagedKVCache,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device = "cpu",
        max_running: int = 64,
        max_batched_tokens: int = 512,
    ):
        if max_batched_tokens < 1 or max_running < 1:
            raise ValueError("max_running and max_batched_tokens must be >= 1")
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.device = torch.device(device)
        self.max_running, self.max_batched_tokens = max_running, max_batched_tokens
        self.max_len = model.rotary.max_len
        self.windows = set(model.config.sliding_windows)
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.aborted: list[_Seq] = []
        self.preemptions = 0
        self.admitted: dict[str, float] = {}  # first admission time per request, for queue-time metrics
        self._arrivals = itertools.count()

    def add_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, priority: int = 0
    ) -> None:
        check_request(prompt, params, self.model.config.vocab_size, self.max_len)
        needed = -(-(len(prompt) + params.max_tokens) // self.cache.block_size)
        if needed > self.cache.num_blocks - 1:
            raise RequestError(
                f"prompt plus max_tokens need {needed} cache blocks; "
                f"the cache has {self.cache.num_blocks - 1}",
                param="max_tokens",
            )
        seq = _Seq(
            request_id, list(prompt), params, priority, next(self._arrivals), self.eos_ids, self.tokenizer
        )
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are free before the next step runs."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._free(seq)
                    seq.finish = "abort"
                    self.aborted.append(seq)
                    return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs = [StepOutput(s.request_id, [], "", "abort") for s in self.aborted]
        self.aborted.clear()
        decodes = self._schedule_decodes()
        chunks = self._schedule_prefills(self.max_batched_tokens - len(decodes))
        sampled: dict[int, int] = {}
        if decodes:
            sampled.update(self._run([(s, len(s.tokens) - 1, 1) for s in decodes]))
        if chunks:
            sampled.update(self._run(chunks))
        for seq in list(self.running):
            if id(seq) not in sampled:
                continue
            token = sampled[id(seq)]
            seq.append(token, self.max_len)
            outputs.append(StepOutput(seq.request_id, [token], seq.text_delta(), seq.finish))
            if seq.finish:
                self.running.remove(seq)
                self._free(seq)
        return outputs

    # scheduling

    def _blocks_needed(self, seq: _Seq, upto: int) -> int:
        return max(0, -(-upto // self.cache.block_size) - len(seq.blocks))

    def _grow(self, seq: _Seq, upto: int) -> bool:
        need = self._blocks_needed(seq, upto)
        if need == 0:
            return True
        blocks = self.cache.allocator.allocate(need)
        if blocks is None:
            return False
        seq.blocks += blocks
        return True

    def _free(self, seq: _Seq) -> None:
        self.cache.allocator.release(seq.blocks)
        seq.blocks, seq.cached = [], 0

    def _victim_order(self):
        # lowest priority first, newest first within a priority
        return sorted(self.running, key=lambda s: (s.priority, -s.arrival))

    def _schedule_decodes(self) -> list[_Seq]:
        decodes = [s for s in self.running if s.prefilled]
        for seq in sorted(decodes, key=lambda s: (-s.priority, s.arrival)):
            while seq in self.running and not self._grow(seq, len(seq.tokens)):
                victim = self._victim_order()[0]
                self._preempt(victim)
        return [s for s in decodes if s in self.running]

    def _preempt(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.waiting.append(seq)
        self.preemptions += 1

    def _schedule_prefills(self, budget: int) -> list[tuple[_Seq, int, int]]:
        chunks = []
        # partly prefilled running sequences first, then waiting ones by priority and arrival
        partial = [s for s in self.running if not s.prefilled]
        self.waiting.sort(key=lambda s: (-s.priority, s.arrival))
        for seq in partial + list(self.waiting):
            if budget <= 0:
                break
            new = seq not in self.running
            if new and len(self.running) >= self.max_running:
                break
            target = len(seq.tokens)
            n = min(budget, target - seq.cached)
            if not self._grow(seq, seq.cached + n):
                break
            if new:
                self.waiting.remove(seq)
                self.running.append(seq)
                self.admitted.setdefault(seq.request_id, time.monotonic())
            chunks.append((seq, seq.cached, n))
            budget -= n
        return chunks

    # execution

    def _run(self, work: list[tuple[_Seq, int, int]]) -> dict[int, int]:
        """One forward pass over (sequence, first position, token count) rows; returns the sampled
        token of every row that reached the end of its known tokens."""
        width = max(n for _, _, n in work)
        tokens = torch.tensor(
            [s.tokens[start : start + n] + [0] * (width - n) for s, start, n in work], device=self.device
        )
        last = torch.tensor([n - 1 for _, _, n in work], device=self.device)
        step = make_step(
            tokens,
            [start for _, start, _ in work],
            list(range(len(work))),
            self.windows,
            last,
            [s.blocks for s, _, _ in work],
            self.cache.block_size,
            [n for _, _, n in work],
        )
        logits = self.model.gather_logits(self.model(tokens, step, self.cache))
        for seq, start, n in work:
            seq.cached = start + n
        done = [(i, s) for i, (s, start, n) in enumerate(work) if start + n == len(s.tokens)]
        if not done:
            return {}
        rows = [i for i, _ in done]
        seqs = [s for _, s in done]
        rows_of = (list(c) for c in zip(*(s.sampling_row() for s in seqs)))
        params = SamplingBatch.build(*rows_of, self.device)
        ids = sample(logits[rows], params).tolist()
        return {id(s): t for s, t in zip(seqs, ids)}


def drain(engine: Engine) -> dict[str, list[StepOutput]]:
    """Run the engine until it has no work; every request's outputs, in order."""
    results: dict[str, list[StepOutput]] = collections.defaultdict(list)
    while engine.has_work():
        for out in engine.step():
            results[out.request_id].append(out)
    return dict(results)
