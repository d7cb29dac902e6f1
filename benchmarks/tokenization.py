"""Tokenizer speed: ringleader's encode and incremental detokenizer against transformers, in one run.

For four tokenizer directories, each loaded both by ``engine.tokenizer.load_tokenizer`` and by
``transformers.AutoTokenizer.from_pretrained`` (the same directory):

- llama3: Llama 3 style byte-level BPE (regex split, BOS by the post-processor);
- qwen2: Qwen2.5 style byte-level BPE (NFC, digit-by-digit split, no BOS);
- llama2: Llama 2 / Mistral style Metaspace BPE with byte fallback;
- demo: the sentencepiece ``tokenizer.model`` of the demo checkpoint (no tokenizer.json).

The first three are written by ``server/testing/hf_tokenizers.py``, trained here with ``--vocab-size``
(32000) on a larger generated corpus than the tests use (that module's own corpus supports about
1100 tokens): Python standard library sources and its pydoc topics (prose with code), synthetic
CJK text and the tests' mixed lines (emoji with ZWJ sequences and modifiers, combining marks,
numbers, runs of whitespace). The texts timed below are built from held-out parts of the same
sources.

The script reports, per tokenizer:

1. encoding a prompt of 8192 tokens (mixed prose, code, CJK and emoji): ringleader ``encode``
   against ``AutoTokenizer(text)["input_ids"]``, median per call, the two alternating every
   repeat; it says whether the ids are identical;
2. detokenizing a 1024-token output after that prompt, per token: ringleader's
   ``IncrementalDetokenizer`` (``push`` every id, then ``flush``); a naive server that decodes
   the whole output so far on every token (``decode(ids[:i + 1])``, holding text that ends in an
   incomplete character), with transformers' decode and with ringleader's; and transformers'
   ``TextIteratorStreamer`` fed token tensors through ``put`` as ``generate`` does. Each streamed
   text is checked against decoding all the ids at once;
3. flatness: the per-token cost over the first and the last 128 tokens of 1k, 4k and 16k-token
   outputs, whose last 128 tokens repeat the text of their first 128 (so that the two windows
   differ in their position only). The naive re-decode's cost of a step does not depend on the
   steps before, so only its two windows are run.

``TOKENIZERS_PARALLELISM=false`` is set before ``tokenizers`` is imported, so that neither side
uses the library's Rust thread pool (it parallelises batch encoding only; transformers encodes a
single text as a batch of one); torch (used only for the streamer's token tensors) gets one thread.
Garbage collection is off inside each timed call (and not forced before one: see
``interleaved``). transformers needs ``protobuf`` (in the bench extras) to convert the demo's
``tokenizer.model``; without it the demo is timed on ringleader's side only.

    python benchmarks/tokenization.py
    python benchmarks/tokenization.py --repeats 11 --only llama3,demo
    python benchmarks/tokenization.py --quick
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from engine.demo import ensure_demo  # noqa: E402
from engine.tokenizer import REPLACEMENT, IncrementalDetokenizer, Tokenizer, load_tokenizer  # noqa: E402
from server.testing import hf_tokenizers  # noqa: E402

PROMPT_TOKENS = 8192
STREAM_TOKENS = 1024
WINDOW = 128
CJK_TRAINING_LINES = 6000
HOLD_OUT = 8  # every 8th source file and pydoc topic is kept out of training, for the timed texts


# ------------------------------------------------------------------------------------------ corpus


@functools.cache
def _sources() -> tuple[list[str], list[str]]:
    """(code, prose) texts of the standard library: its top-level modules and its pydoc topics."""
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    topics = pydoc_data.topics.topics
    return code, [topics[k] for k in sorted(topics)]


def _cjk_pools() -> list[tuple[list[str], list[float]]]:
    """Character pools with Zipf cumulative weights: Han, Japanese kana with Han, Hangul syllables."""
    rng = random.Random(0)  # the same characters (and ranks) for every text
    han = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA6), 3500)]
    kana = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
    hangul = [chr(c) for c in rng.sample(range(0xAC00, 0xD7A4), 1500)]
    pools = [han, kana + han[:800], hangul]
    return [(pool, list(itertools.accumulate(1.0 / (r + 1) for r in range(len(pool))))) for pool in pools]


def cjk_lines(seed: int, lines: int) -> list[str]:
    """Synthetic CJK sentences: characters drawn by frequency rank, with CJK punctuation; the
    Hangul ones mostly with spaces between short runs, as Korean is written."""
    rng = random.Random(seed)
    pools = _cjk_pools()
    out = []
    for i in range(lines):
        pool, cum = pools[i % len(pools)]
        sentences = []
        for _ in range(rng.randint(1, 4)):
            chars = rng.choices(pool, cum_weights=cum, k=rng.randint(6, 28))
            if i % len(pools) == 2:
                cut = sorted(rng.sample(range(1, len(chars)), len(chars) // 3))
                chars = [" ".join("".join(chars[a:b]) for a, b in zip([0, *cut], [*cut, len(chars)]))]
            sentences.append("".join(chars) + rng.choice("。。，！？、"))
        out.append("".join(sentences) + "\n")
    return out


def training_corpus() -> list[str]:
    code, prose = _sources()
    lines: list[str] = []
    for texts in (code, prose):
        for i, text in enumerate(texts):
            if i % HOLD_OUT:
                lines += text.splitlines(keepends=True)
    lines += cjk_lines(seed=0, lines=CJK_TRAINING_LINES)
    lines += hf_tokenizers.training_corpus(seed=0, lines=6000)
    return lines


@functools.cache
def document(min_chars: int, seed: int = 1) -> str:
    """Held-out mixed text: prose paragraphs, code, CJK and emoji lines, in rotation."""
    code, prose = _sources()
    code_lines = [ln for i, t in enumerate(code) if i % HOLD_OUT == 0 for ln in t.splitlines(keepends=True)]
    paragraphs = [p + "\n\n" for i, t in enumerate(prose) if i % HOLD_OUT == 0 for p in t.split("\n\n")]
    paragraphs = [p for p in paragraphs if p.strip()]
    cjk = cjk_lines(seed=seed, lines=3000)
    mixed = [ln + "\n" for ln in hf_tokenizers.training_corpus(seed=seed, lines=6000)]
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    c = p = j = m = 0
    while size < min_chars:
        kind = rng.choice("ppccjm")
        if kind == "p":
            block = "".join(paragraphs[(p + k) % len(paragraphs)] for k in range(2))
            p += 2
        elif kind == "c":
            n = rng.randint(10, 40)
            block = "```python\n" + "".join(code_lines[(c + k) % len(code_lines)] for k in range(n)) + "```\n"
            c += n
        elif kind == "j":
            block = "".join(cjk[(j + k) % len(cjk)] for k in range(3))
            j += 3
        else:
            block = "".join(mixed[(m + k) % len(mixed)] for k in range(6))
            m += 6
        parts.append(block)
        size += len(block)
    return "".join(parts)


@contextlib.contextmanager
def larger_corpus(lines: list[str]):
    """hf_tokenizers' writers train on its ``training_corpus()``: point that at ``lines`` meanwhile."""
    original = hf_tokenizers.training_corpus
    hf_tokenizers.training_corpus = lambda *args, **kwargs: lines
    try:
        yield
    finally:
        hf_tokenizers.training_corpus = original


def write_tokenizers(root: Path, vocab_size: int, only: set[str] | None) -> list[tuple[str, str, Path]]:
    """(name, description, directory) of the tokenizers, training the BPE ones."""
    out = []
    if only is not None and not only - {"demo"}:
        return [("demo", "the demo checkpoint's sentencepiece tokenizer.model", ensure_demo())]
    corpus = training_corpus()
    print(f"training corpus: {len(corpus)} lines, {sum(map(len, corpus)) / 1e6:.2f} M characters")
    with larger_corpus(corpus):
        for name, desc, write, options in (
            ("llama3", "Llama 3 style byte-level BPE", hf_tokenizers.write_llama3_tokenizer, {}),
            ("qwen2", "Qwen2.5 style byte-level BPE", hf_tokenizers.write_qwen2_tokenizer, {}),
            (
                "llama2",
                "Llama 2 style Metaspace BPE with byte fallback",
                hf_tokenizers.write_llama2_tokenizer,
                {"form": "metaspace"},
            ),
        ):
            if only is None or name in only:
                t = time.perf_counter()
                path = write(root / name, vocab_size=vocab_size, **options)
                out.append((name, f"{desc}, trained in {time.perf_counter() - t:.1f} s", path))
    if only is None or "demo" in only:
        out.append(("demo", "the demo checkpoint's sentencepiece tokenizer.model", ensure_demo()))
    return out


# ------------------------------------------------------------------------------------------ timing


def interleaved(runs: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, dict[str, float]]:
    """Medians of what each run measures, the runs alternating within every repeat (the order
    reversed every other repeat), after one untimed round. Garbage collection is off inside a run;
    it is not forced before one, because a collection evicts the caches: the next push then costs
    about 0.1 ms, which would be counted in the first window of the flatness table only."""
    gc.collect()
    for fn in runs.values():
        fn()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    items = list(runs.items())
    for r in range(repeats):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            gc.disable()
            try:
                measured = fn()
            finally:
                gc.enable()
            for key, value in measured.items():
                samples[name].setdefault(key, []).append(value)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def timed_stream(push: Callable, items: list, finish: Callable[[], object]) -> dict[str, float]:
    """Seconds per item over the whole stream (``finish`` included) and over its first and last
    WINDOW items."""
    n = len(items)
    head, body, tail = items[:WINDOW], items[WINDOW : n - WINDOW], items[n - WINDOW :]
    t0 = time.perf_counter()
    for x in head:
        push(x)
    t1 = time.perf_counter()
    for x in body:
        push(x)
    t2 = time.perf_counter()
    for x in tail:
        push(x)
    t3 = time.perf_counter()
    finish()
    t4 = time.perf_counter()
    return {"total": (t4 - t0) / n, "first": (t1 - t0) / len(head), "last": (t3 - t2) / len(tail)}


class NaiveStream:
    """What a naive server does: decode the whole output so far on every token, and send what it
    adds (holding text that ends in an incomplete character)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.sent = 0
        self.parts: list[str] = []

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if not text.endswith(REPLACEMENT):
            self.parts.append(text[self.sent :])
            self.sent = len(text)

    def finish(self) -> None:
        self.parts.append(self.decode(self.ids)[self.sent :])

    def windows(self, ids: list[int]) -> dict[str, float]:
        """Per-token seconds of the first and last WINDOW steps of a stream of ``ids``: each step
        costs what decoding the ids so far costs, whatever came before, so the middle is skipped."""
        out = {}
        for key, start in (("first", 0), ("last", len(ids) - WINDOW)):
            self.ids = list(ids[:start])
            self.sent = len(self.decode(self.ids))
            t = time.perf_counter()
            for token_id in ids[start : start + WINDOW]:
                self.push(token_id)
            out[key] = (time.perf_counter() - t) / WINDOW
        return out


# ------------------------------------------------------------------------------------------- bench


def prompt_text(tok: Tokenizer, doc: str, tokens: int) -> str:
    """The shortest prefix of ``doc`` that encodes to at least ``tokens`` tokens (specials included)."""
    hi = 2 * tokens
    while len(tok.encode(doc[:hi])) < tokens:
        if hi >= len(doc):
            raise SystemExit(f"the generated document holds fewer than {tokens} tokens of {tok.path}")
        hi = min(2 * hi, len(doc))
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.encode(doc[:mid])) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    return doc[:lo]


def stream_ids(tok: Tokenizer, rest: list[int], n: int) -> list[int]:
    """``n`` output ids whose last WINDOW decode (nearly) the same text as their first WINDOW: the
    text after the prompt, cut at a character boundary, then its beginning again. So the two
    windows of the flatness table differ in their position only."""
    cut = n - WINDOW
    while cut > WINDOW and tok.decode(rest[:cut]).endswith(REPLACEMENT):
        cut -= 1  # a byte-level token that ends inside a character: cut before it
    return rest[:cut] + rest[: n - cut]


def first_difference(ours: Tokenizer, a: list[int], b: list[int]) -> str:
    if a == b:
        return "identical"
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    pieces = [[ours.id_to_token(t) for t in ids[max(0, i - 1) : i + 3]] for ids in (a, b)]
    return (
        f"DIFFERENT ({len(a)} and {len(b)} ids, first at index {i}; from index {max(0, i - 1)}, ringleader "
        f"{pieces[0]}, transformers {pieces[1]})"
    )


def same_text(got: str, want: str) -> str:
    if got == want:
        return "yes"
    i = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return f"NO (lengths {len(got)} and {len(want)}; at {i}: {got[i : i + 12]!r} vs {want[i : i + 12]!r})"


def us(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e6:.2f}"


def streams(
    ours: Tokenizer, theirs, prompt_tail: list[int], out_ids: list[int], repeats: int
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Time the detokenizers on one output, interleaved, and check the text each streamed."""
    import transformers

    texts: dict[str, str] = {}
    tensors = [torch.tensor([i]) for i in out_ids]  # what generate hands a streamer, made untimed

    def hf_decode(token_ids):
        return theirs.decode(token_ids, skip_special_tokens=True)

    def run_incremental():
        detok = IncrementalDetokenizer(ours, prompt_tail)
        parts: list[str] = []
        measured = timed_stream(
            lambda i: parts.append(detok.push(i)), out_ids, lambda: parts.append(detok.flush())
        )
        texts["incremental"] = "".join(parts)
        return measured

    def run_streamer():
        streamer = transformers.TextIteratorStreamer(theirs, skip_prompt=True)
        streamer.put(torch.tensor([prompt_tail]))  # as generate does: the prompt first, skipped
        measured = timed_stream(streamer.put, tensors, streamer.end)
        texts["streamer"] = "".join(streamer)
        return measured

    def naive(decode, key):
        def run():
            stream = NaiveStream(decode)
            if len(out_ids) > STREAM_TOKENS:
                return stream.windows(out_ids)
            measured = timed_stream(stream.push, out_ids, stream.finish)
            texts[key] = "".join(stream.parts)
            return measured

        return run

    runs = {"incremental": run_incremental}
    if theirs is not None:
        runs |= {"streamer": run_streamer, "naive_hf": naive(hf_decode, "naive_hf")}
    if len(out_ids) == STREAM_TOKENS:
        runs["naive_ours"] = naive(ours.decode, "naive_ours")
    results = interleaved(runs, repeats)
    # ringleader's has the prompt as context: its text is what the output adds after the prompt;
    # the others decode the output alone
    prompt_str = ours.decode(prompt_tail)
    checks = {"incremental": same_text(prompt_str + texts["incremental"], ours.decode(prompt_tail + out_ids))}
    for key, decode in (("streamer", hf_decode), ("naive_hf", hf_decode), ("naive_ours", ours.decode)):
        if key in texts:
            checks[key] = same_text(texts[key], decode(out_ids))
    return results, checks


def bench(name: str, desc: str, path: Path, args) -> None:
    import transformers

    ours = load_tokenizer(path)
    print(f"\n## {name}: {desc}\n")
    try:
        theirs = transformers.AutoTokenizer.from_pretrained(path)
        hf_desc = f"transformers {type(theirs).__name__}, vocabulary {len(theirs)}"
    except Exception as e:  # transformers converts a tokenizer.model with protobuf, else tries tiktoken
        theirs = None
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        if ours.backend == "sentencepiece" and importlib.util.find_spec("google") is None:
            reason = "it converts a tokenizer.model with protobuf, which is not installed"
        hf_desc = f"transformers cannot load it ({reason}): ringleader only"
    print(f"{path}: ringleader {ours.backend} ({ours.path.name}), vocabulary {ours.vocab_size}; {hf_desc}")

    doc = document(args.doc_chars)
    prompt = prompt_text(ours, doc, PROMPT_TOKENS)
    ids = ours.encode(prompt)

    def run_ours():
        t = time.perf_counter()
        ours.encode(prompt)
        return {"t": time.perf_counter() - t}

    def run_theirs():
        t = time.perf_counter()
        theirs(prompt)["input_ids"]
        return {"t": time.perf_counter() - t}

    encoders = {"ours": run_ours} | ({"theirs": run_theirs} if theirs is not None else {})
    enc = interleaved(encoders, args.encode_repeats)
    check = first_difference(ours, ids, theirs(prompt)["input_ids"]) if theirs is not None else "not compared"
    print(
        f"\n1. encode a {len(ids)}-token prompt ({len(prompt)} characters), median of "
        f"{args.encode_repeats}, interleaved; ids {check}"
    )
    print("\n| encoder | ms per call | tokens/s | of ringleader's time |")
    print("| --- | ---: | ---: | ---: |")
    t_ours = enc["ours"]["t"]
    print(f"| ringleader `encode` | {t_ours * 1e3:.2f} | {len(ids) / t_ours / 1e6:.3f} M | 1.00x |")
    if theirs is not None:
        t = enc["theirs"]["t"]
        print(
            f"| `AutoTokenizer(text)['input_ids']` | {t * 1e3:.2f} | {len(ids) / t / 1e6:.3f} M "
            f"| {t / t_ours:.2f}x |"
        )

    # the outputs: the document's text after the prompt
    rest = ours.encode(doc[len(prompt) :], add_special_tokens=False)
    lengths = sorted({STREAM_TOKENS, *args.lengths})
    if len(rest) < max(lengths):
        raise SystemExit(f"{path}: {len(rest)} tokens of text after the prompt, fewer than {max(lengths)}")
    prompt_tail = ids[-IncrementalDetokenizer.CONTEXT :]

    results: dict[int, dict[str, dict[str, float]]] = {}
    checks: dict[int, dict[str, str]] = {}
    for n in lengths:
        results[n], checks[n] = streams(ours, theirs, prompt_tail, stream_ids(ours, rest, n), args.repeats)

    r, c = results[STREAM_TOKENS], checks[STREAM_TOKENS]
    print(
        f"\n2. detokenize a {STREAM_TOKENS}-token output after the prompt, µs per token "
        f"(whole stream / tokens), median of {args.repeats}, interleaved"
    )
    print("\n| detokenizer | µs/token | of ringleader's | streamed text equals the ids decoded at once |")
    print("| --- | ---: | ---: | --- |")
    base = r["incremental"]["total"]
    for key, label in (
        ("incremental", "ringleader `IncrementalDetokenizer` push + flush"),
        ("streamer", "transformers `TextIteratorStreamer.put` + end"),
        ("naive_hf", "naive: `AutoTokenizer.decode(ids[:i+1])` per token"),
        ("naive_ours", "naive: ringleader `decode(ids[:i+1])` per token"),
    ):
        if key in r:
            print(f"| {label} | {us(r[key]['total'])} | {r[key]['total'] / base:.1f}x | {c[key]} |")

    print(
        f"\n3. flatness: µs per token over the first and the last {WINDOW} tokens of an output (the last "
        f"{WINDOW} repeat the first {WINDOW}'s text), median of {args.repeats}"
    )
    cols = [("incremental", "ringleader")]
    if theirs is not None:
        cols += [("streamer", "TextIteratorStreamer"), ("naive_hf", "naive re-decode (transformers)")]
    print(
        "\n| output tokens | "
        + " | ".join(f"{label} first | last | last / first" for _, label in cols)
        + " |"
    )
    print("| ---: |" + " ---: | ---: | ---: |" * len(cols))
    for n in lengths:
        row = [str(n)]
        for key, _ in cols:
            first, last = results[n][key]["first"], results[n][key]["last"]
            row += [us(first), us(last), f"{last / first:.2f}x"]
        print("| " + " | ".join(row) + " |")
    failed = {n: {k: v for k, v in ch.items() if v != "yes"} for n, ch in checks.items()}
    failed = {n: v for n, v in failed.items() if v}
    if failed:
        print(f"\ntext checks that failed: {failed}")
    else:
        outputs = ", ".join(map(str, lengths))
        print(f"\nevery streamed text equals its ids decoded at once (outputs of {outputs} tokens)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each stream (median reported)")
    parser.add_argument("--encode-repeats", type=int, help="repeats of each encode (default: 4x --repeats)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizers (default 32000)")
    parser.add_argument("--lengths", default="1024,4096,16384", help="output lengths of the flatness table")
    parser.add_argument("--only", help="a comma-separated subset of llama3,qwen2,llama2,demo")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: vocabulary 2000, 1 repeat, outputs up to 2048 tokens"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
        args.vocab_size = args.vocab_size or 2000
        args.lengths = "1024,2048"
    args.vocab_size = args.vocab_size or 32000
    args.encode_repeats = args.encode_repeats or 4 * args.repeats
    args.lengths = sorted({int(n) for n in args.lengths.split(",")})
    if min(args.lengths) < 2 * WINDOW:
        parser.error(f"--lengths must be at least {2 * WINDOW}")
    # characters enough for the prompt and the longest output with the least characters per token
    args.doc_chars = 6 * (PROMPT_TOKENS + max(args.lengths + [STREAM_TOKENS]))

    import sentencepiece
    import tokenizers
    import transformers

    transformers.logging.set_verbosity_error()  # "longer than the model's maximum length" warnings
    torch.set_num_threads(1)
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, transformers "
        f"{transformers.__version__}, tokenizers {tokenizers.__version__}, sentencepiece "
        f"{sentencepiece.__version__}, torch {torch.__version__}"
    )
    print(f"TOKENIZERS_PARALLELISM=false, torch threads 1; load average {os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ringleader-tok-") as root:
        only = set(args.only.split(",")) if args.only else None
        for name, desc, path in write_tokenizers(Path(root), args.vocab_size, only):
            bench(name, desc, path, args)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
