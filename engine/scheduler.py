"""Continuous batching over a paged KV cache: requests join and leave the running batch every step.

Each ``Engine.step``:

1. decode: every running sequence whose prompt is cached gets one token. A sequence that needs a
   new block and finds none free preempts the lowest-priority, newest running sequence, whose
   blocks go back to the pool and which waits again at the head of its priority to be recomputed
   (prompt plus the tokens it already has);
2. prefill: waiting sequences, higher priority first and first come first served within one, are
   admitted while there are free blocks, running slots and step tokens left; a long prompt is
   prefilled in chunks of what the step's token budget leaves after the decodes, so that it never
   stalls the running sequences for more than one step's budget. With prefix caching (on by
   default) a sequence starts on the cached blocks of the longest prefix of its tokens that some
   earlier sequence computed (whole blocks, short of its last token) and prefills only the rest;
   each block it fills is cached in turn when the step that computed it has run.

Decode rows (in up to ``micro_batches`` groups) and prefill chunks run as separate forward passes
of one step, all handed to the executor before any result is read, so that on a pipeline they are
in flight together. The executor runs them in this process or on every rank of a tp x pp replica
(``engine.executor``); the scheduler itself only deals in token ids, block ids and plans. Requests
that run out of time (``timeout_s``) finish with reason "timeout" before the next step. Sampling is
counter-based (``engine.sampling``), so a recomputed sequence draws exactly the tokens it would
have drawn. A constrained sequence keeps its grammar's matcher (``engine.structured``) here, across
preemptions; each plan carries the token masks of its constrained rows that sample.
"""

from __future__ import annotations

import collections
import itertools
import time

import torch

from engine.compiled import resolve_decode_mode
from engine.config import ModelConfig
from engine.errors import RequestError, RingleaderError
from engine.executor import LocalExecutor, Plan
from engine.kv_cache import BlockAllocator, PagedKVCache, extend_block_hashes
from engine.loader import Checkpoint, build_model
from engine.model import CausalLM
from engine.request import EngineStats, SamplingParams, Sequence, StepOutput, check_request, sampling_fields
from engine.structured import StructuredOutputs
from engine.tokenizer import IncrementalDetokenizer, Tokenizer, has_tokenizer, load_tokenizer

BATCHING = ("continuous", "static")


def cache_blocks(
    kv_cache_mib: int, layers: int, block_size: int, kv_heads: int, config: ModelConfig, dtype: torch.dtype
) -> int:
    """How many cache blocks ``kv_cache_mib`` holds for ``layers`` layers; at least 2, or an error."""
    blocks = PagedKVCache.blocks_for_budget(
        kv_cache_mib << 20, layers, block_size, kv_heads, config.head_dim, dtype
    )
    if blocks < 2:
        raise RingleaderError(
            f"--kv-cache-mib {kv_cache_mib} holds fewer than 2 blocks of {block_size} tokens"
        )
    return blocks


class _Seq(Sequence):
    """A sequence under the scheduler: its priority, arrival order, cache blocks and how many of
    its tokens are in them."""

    def __init__(
        self, request_id, prompt, params, priority, arrival, eos_ids, tokenizer, deadline, generated
    ):
        super().__init__(0, prompt, params, eos_ids, tokenizer)
        if generated:  # resumed elsewhere: its text so far was handed out there
            self.out = list(generated)
            self.detok = IncrementalDetokenizer(tokenizer, prompt + self.out) if tokenizer else None
        self.request_id, self.priority, self.arrival = request_id, priority, arrival
        self.arrived = time.monotonic()
        self.deadline = deadline  # monotonic time after which it is cut off, or None
        self.blocks: list[int] = []
        self.cached = 0  # tokens whose keys and values are in the cache
        self.hashes: list[int] = []  # block_hash of each full block of its tokens, as far as computed
        self.registered = 0  # leading blocks that are in the prefix cache (found there, or put there)
        self.cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
        self.admitted = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def prefilled(self) -> bool:
        return bool(self.out) and self.cached >= len(self.prompt) + len(self.out) - 1


class Engine:
    """The scheduler of one model replica. ``executor`` runs its plans: a ``LocalExecutor`` for a
    model in this process, or a ``DistributedExecutor`` for a replica spread over tp x pp ranks.

    Knobs: ``max_running`` sequences in the batch; ``max_batched_tokens`` per step (decodes plus
    prefill chunks); ``batching``: "continuous" (requests join and leave every step) or "static"
    (the baseline continuous batching is measured against: a batch is formed when none is
    running and runs until its last sequence finishes, the rows of sequences that finished early
    still computed, as static batching runtimes do); ``max_wait_s``: newly arrived requests
    wait up to this long for others to arrive, unless they already fill the free running slots,
    so that their prefills share steps (0: start at once); ``micro_batches``: decode groups kept
    in flight at once (a pipeline's stage count).
    """

    def __init__(
        self,
        executor,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        tokenizer: Tokenizer | None = None,
        max_len: int | None = None,
        max_running: int = 64,
        max_batched_tokens: int = 512,
        batching: str = "continuous",
        max_wait_s: float = 0.0,
        micro_batches: int = 1,
        min_micro_batch_rows: int = 32,
        prefix_caching: bool = True,
    ):
        if max_batched_tokens < 1 or max_running < 1:
            raise ValueError("max_running and max_batched_tokens must be >= 1")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.executor, self.config, self.tokenizer = executor, config, tokenizer
        self.num_blocks, self.block_size = num_blocks, block_size
        self.allocator = BlockAllocator(num_blocks, prefix_caching)
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up in the prefix cache, and found
        self.max_running, self.max_batched_tokens = max_running, max_batched_tokens
        self.batching, self.max_wait_s = batching, max_wait_s
        self.micro_batches, self.min_micro_batch_rows = micro_batches, min_micro_batch_rows
        self.max_len = max_len or config.max_position_embeddings
        self.eos_ids = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.structured = StructuredOutputs(tokenizer, config.vocab_size, self.eos_ids)
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.finished_early: list[tuple[_Seq, str]] = []  # aborted or timed out, to report
        self.preemptions = 0
        self.admitted: dict[str, float] = {}  # first admission time per request, for queue-time metrics
        self._arrivals = itertools.count()
        # static batching: rows in the current batch, and what a finished sequence's row runs (a
        # token with no cache blocks: it reads and writes the reserved block 0, and is not sampled)
        self.batch_rows = 0
        greedy = SamplingParams(max_tokens=1, temperature=0)
        self._padding = _Seq("<padding>", [0], greedy, 0, -1, set(), None, None, None)
        executor.begin_paged(num_blocks, block_size)

    @classmethod
    def for_model(
        cls, model: CausalLM, num_blocks: int, block_size: int, tokenizer=None, decode_mode="eager", **kw
    ) -> Engine:
        """An engine over ``model`` in this process; ``decode_mode`` "compiled" compiles its decode
        steps (``engine.compiled``)."""
        device = next(model.parameters()).device
        return cls(
            LocalExecutor(model, device, decode_mode),
            model.config,
            num_blocks,
            block_size,
            tokenizer,
            model.rotary.max_len,
            **kw,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
        kv_cache_mib: int = 512,
        block_size: int = 16,
        progress: bool = False,
        quantize: str | None = None,
        **kw,
    ) -> Engine:
        """Load ``model_dir`` in this process and give it a paged cache of ``kv_cache_mib``."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = ModelConfig.from_hf(model_dir)
        model = build_model(
            config, Checkpoint(model_dir), device, dtype, max_len, progress=progress, quantize=quantize
        )
        tokenizer = load_tokenizer(model_dir, config.vocab_size) if has_tokenizer(model_dir) else None
        kw["decode_mode"] = resolve_decode_mode(kw.get("decode_mode", "auto"), device)
        blocks = cache_blocks(
            kv_cache_mib,
            len(model.layer_ids),
            block_size,
            model.kv_heads,
            config,
            next(model.parameters()).dtype,
        )
        return cls.for_model(model, blocks, block_size, tokenizer, **kw)

    def warm_up(self) -> list[int]:
        """Compile the decode steps of every batch size the engine can run, where the executor
        compiles them; the batch sizes compiled."""
        warm_up = getattr(self.executor, "warm_up", None)
        return warm_up(self.max_running) if warm_up is not None else []

    @property
    def keepalive_s(self) -> float | None:
        """How long the engine may sit idle before ``keepalive`` must be called (the other ranks of a
        replica wait at most so long for the head); None: never."""
        return self.executor.keepalive_s

    def keepalive(self) -> None:
        """Tell the other ranks of a replica that the head is alive (nothing in one process)."""
        self.executor.keepalive()

    @property
    def distributed(self) -> bool:
        """Whether the replica spans ranks (a failed step then means a lost rank)."""
        return self.executor.distributed

    def admitted_at(self, request_id: str) -> float | None:
        """When a request was first admitted to the running batch (monotonic), if it was."""
        return self.admitted.get(request_id)

    def forget(self, request_id: str) -> None:
        """Drop what is kept of a finished request for metrics."""
        self.admitted.pop(request_id, None)

    def stats(self) -> EngineStats:
        """The engine's load now: its batch, its queue and its KV cache."""
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            free_blocks=self.allocator.num_free,
            usable_blocks=self.num_blocks - 1,
            preemptions=self.preemptions,
            cached_free_blocks=self.allocator.num_cached_free,
            prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits,
        )

    @property
    def prefix_caching(self) -> bool:
        return self.allocator.prefix_caching

    def reset_prefix_cache(self) -> int | None:
        """Forget every cached prefix (``POST /reset_prefix_cache``); how many blocks were cached, or
        None (nothing done) while sequences are running: their blocks could not be forgotten, and
        would go on being found through the blocks they fill after the reset."""
        if self.running:
            return None
        return self.allocator.reset()  # waiting sequences hold no blocks: nothing of theirs is registered

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        priority: int = 0,
        timeout_s: float | None = None,
        generated: list[int] | None = None,
    ) -> None:
        """Queue a request; ``timeout_s``: it finishes with reason "timeout" if still running then.
        ``generated``: tokens it already produced (on a replica that was lost); it goes on from
        there, drawing the same samples it would have drawn, and its text starts after them."""
        check_request(prompt, params, self.config.vocab_size, self.max_len)
        if generated and (
            len(generated) >= params.max_tokens or not all(isinstance(t, int) for t in generated)
        ):
            raise RequestError(
                f"{len(generated)} generated tokens leave nothing of max_tokens={params.max_tokens}"
            )
        needed = -(-(len(prompt) + params.max_tokens) // self.block_size)
        if needed > self.num_blocks - 1:
            raise RequestError(
                f"prompt plus max_tokens need {needed} cache blocks; the cache has {self.num_blocks - 1}",
                param="max_tokens",
            )
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        seq = _Seq(
            request_id,
            list(prompt),
            params,
            priority,
            next(self._arrivals),
            self.eos_ids,
            self.tokenizer,
            deadline,
            generated,
        )
        if params.grammar is not None:  # a resumed request's tokens are replayed through its matcher
            seq.grammar = self.structured.matcher(params.grammar, seq.out)
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Cancel a request; its blocks are free before the next step runs."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    self._drop(seq, reason)
                    return True
        return False

    def _drop(self, seq: _Seq, reason: str) -> None:
        (self.running if seq in self.running else self.waiting).remove(seq)
        self._free(seq)
        seq.finish = reason
        self.finished_early.append((seq, reason))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.finished_early)

    def idle_for(self) -> float:
        """Seconds until the next step can do anything, when all there is to do is wait for held
        requests (``max_wait_s``); 0 when a step would do work now."""
        if self.running or self.finished_early or not self.waiting:
            return 0.0
        held = self._held_until()
        return max(0.0, held - time.monotonic()) if held is not None else 0.0

    def _held_until(self) -> float | None:
        """While new arrivals are held back to batch them, the time their wait ends."""
        if self.max_wait_s <= 0:
            return None
        new = [s for s in self.waiting if not s.admitted]
        if not new or len(new) >= self.max_running - len(self.running):
            return None
        until = min(s.arrived for s in new) + self.max_wait_s
        return until if until > time.monotonic() else None

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        now = time.monotonic()
        for seq in [s for s in self.waiting + self.running if s.deadline is not None and now >= s.deadline]:
            self._drop(seq, "timeout")
        outputs = [StepOutput(s.request_id, [], "", reason) for s, reason in self.finished_early]
        self.finished_early.clear()
        decodes = self._schedule_decodes()
        chunks = self._schedule_prefills(self.max_batched_tokens - len(decodes))
        if self.batching == "static" and decodes:
            # a static batch keeps the rows of its finished sequences until its last one ends
            decodes += [self._padding] * (self.batch_rows - len(self.running))
        n = len(decodes)
        m = max(1, min(self.micro_batches, n // max(1, self.min_micro_batch_rows)))
        work = [[(s, len(s.tokens) - 1, 1) for s in decodes[i * n // m : (i + 1) * n // m]] for i in range(m)]
        work = [w for w in work + [chunks] if w]
        plans = [self._submit(mb, w) for mb, w in enumerate(work)]  # all in flight, then collected
        sampled: dict[int, tuple[int, tuple | None]] = {}
        for mb, (w, done) in enumerate(zip(work, plans)):
            result = self.executor.result(mb)
            for i, seq in done:
                lp = None
                if result.logprobs is not None and seq.params.logprobs is not None:
                    lp = result.row_logprobs(i, seq.params.logprobs)
                sampled[id(seq)] = (result.ids[i], lp)
            for seq, start, n in w:
                seq.cached = start + n
                if self.allocator.prefix_caching and seq.blocks:
                    self._cache_blocks(seq)
        for seq in list(self.running):
            if id(seq) not in sampled:
                continue
            token, lp = sampled[id(seq)]
            seq.append(token, self.max_len)
            lps = [lp] if lp else None
            out = StepOutput(
                seq.request_id, [token], seq.text_delta(), seq.finish, lps, seq.stop_reason, seq.cached_tokens
            )
            outputs.append(out)
            if seq.finish:
                self.running.remove(seq)
                self._free(seq)
        return outputs

    # scheduling

    def _blocks_needed(self, seq: _Seq, upto: int) -> int:
        return max(0, -(-upto // self.block_size) - len(seq.blocks))

    def _grow(self, seq: _Seq, upto: int) -> bool:
        need = self._blocks_needed(seq, upto)
        if need == 0:
            return True
        blocks = self.allocator.allocate(need)
        if blocks is None:
            return False
        seq.blocks += blocks
        return True

    def _free(self, seq: _Seq) -> None:
        self.allocator.release(seq.blocks)
        seq.blocks, seq.cached, seq.registered = [], 0, 0

    # prefix caching

    def _block_hashes(self, seq: _Seq, n: int) -> list[int]:
        """The hashes of the sequence's first ``n`` full blocks."""
        if len(seq.hashes) < n:
            extend_block_hashes(seq.hashes, seq.tokens, self.block_size, n)
        return seq.hashes[:n]

    def _reuse_prefix(self, seq: _Seq) -> None:
        """Start a sequence that holds no blocks on the longest chain of cached blocks of its tokens,
        short of its last token (which is computed, so that there are logits to sample from)."""
        matched = self.allocator.match(self._block_hashes(seq, (len(seq.tokens) - 1) // self.block_size))
        self.allocator.take(matched)
        seq.blocks, seq.registered = matched, len(matched)
        seq.cached = len(matched) * self.block_size

    def _cache_blocks(self, seq: _Seq) -> None:
        """Put the sequence's blocks that are now full of computed tokens in the prefix cache."""
        full, bs = seq.cached // self.block_size, self.block_size
        if full <= seq.registered:
            return
        first, hashes, tokens = seq.registered, self._block_hashes(seq, full), seq.tokens
        self.allocator.cache(
            seq.blocks[first:full],
            hashes[first:],
            hashes[first - 1] if first else None,
            [tokens[i * bs : (i + 1) * bs] for i in range(first, full)],
        )
        seq.registered = full

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

    def _admit(self, seq: _Seq) -> None:
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.admitted = True
        self.admitted.setdefault(seq.request_id, time.monotonic())

    def _schedule_prefills(self, budget: int) -> list[tuple[_Seq, int, int]]:
        self.waiting.sort(key=lambda s: (-s.priority, s.arrival))
        if self.batching == "static":
            # a new batch only when the last one has finished; then as many as may run
            if not self.running:
                for seq in self.waiting[: self.max_running]:
                    self._admit(seq)
                self.batch_rows = len(self.running)
            candidates = [s for s in self.running if not s.prefilled]
        else:
            # partly prefilled running sequences first, then waiting ones by priority and arrival
            held = self._held_until() is not None
            waiting = [s for s in self.waiting if s.admitted or not held]
            candidates = [s for s in self.running if not s.prefilled] + waiting
        chunks = []
        for seq in candidates:
            if budget <= 0:
                break
            new = seq not in self.running
            if new and len(self.running) >= self.max_running:
                break
            lookup = self.allocator.prefix_caching and not seq.blocks
            if lookup:
                self._reuse_prefix(seq)
            n = min(budget, len(seq.tokens) - seq.cached)
            if not self._grow(seq, seq.cached + n):
                if new:
                    self._free(seq)
                break
            if lookup:
                self.prefix_queries += len(seq.tokens)
                self.prefix_hits += seq.cached
            if seq.cached_tokens is None:
                seq.cached_tokens = min(seq.cached, len(seq.prompt))
            if new:
                self._admit(seq)
            chunks.append((seq, seq.cached, n))
            budget -= n
        return chunks

    # execution

    def _submit(self, mb: int, work: list[tuple[_Seq, int, int]]) -> list[tuple[int, _Seq]]:
        """Send one forward pass over (sequence, first position, token count) rows to the executor;
        returns (row, sequence) for the rows that reach the end of their known tokens: the ones
        whose sampled token counts."""
        width = max(n for _, _, n in work)
        sampled = [(i, s) for i, (s, start, n) in enumerate(work) if start + n == len(s.tokens)]
        constrained = [(i, s.grammar) for i, s in sampled if s.grammar is not None]
        # a row that only prefills part of its prompt is sampled too, and its token dropped
        plan = Plan(
            mb=mb,
            tokens=[s.tokens[start : start + n] + [0] * (width - n) for s, start, n in work],
            starts=[start for _, start, _ in work],
            logit_index=[n - 1 for _, _, n in work],
            lengths=[n for _, _, n in work],
            block_tables=[s.blocks for s, _, _ in work],
            mask_rows=[i for i, _ in constrained],
            masks=self.structured.masks(constrained) if constrained else None,
            **sampling_fields([s for s, _, _ in work]),
        )
        self.executor.submit(plan)
        return sampled


def drain(engine: Engine) -> dict[str, list[StepOutput]]:
    """Run the engine until it has no work; every request's outputs, in order."""
    results: dict[str, list[StepOutput]] = collections.defaultdict(list)
    while engine.has_work():
        for out in engine.step():
            results[out.request_id].append(out)
    return dict(results)
