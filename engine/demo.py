"""The demo checkpoint: a small Llama-architecture model in exact Hugging Face format, built offline.

``build_demo(path)`` writes config.json, generation_config.json, model.safetensors (random weights
from a fixed seed), tokenizer.model (sentencepiece, trained here on text generated below) and
tokenizer_config.json. Identity normalization, no dummy prefix, kept whitespace and byte fallback
make the tokenizer round-trip any UTF-8 text exactly. The weights are untrained, so the model
produces fluent-looking nonsense; it exists to exercise the whole runtime without a download.

    python -m engine.demo [PATH] [--preset demo|tiny] [--force]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

VERSION = 2

PRESETS = {
    # about 20M parameters
    "demo": dict(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=2048,
    ),
    # about 150M parameters, for benchmarks
    "demo-150m": dict(
        hidden_size=768,
        intermediate_size=2816,
        num_hidden_layers=18,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=2048,
    ),
    # a few hundred thousand parameters, for tests
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=512,
    ),
}

_WORDS = (
    "the a an of to in on at by for with from about over under between through after before "
    "model token rank node cluster leader request batch cache layer head vector matrix tensor "
    "ring tree star graph message byte packet stream server client engine kernel memory device "
    "fast slow small large early late quiet bright simple careful honest exact stable "
    "run send read write split merge wait serve learn build test measure count start stop "
    "river mountain garden window letter morning evening winter summer city road bridge "
    "and or but so because while when where which that this those these it they we you "
    "is are was were be been has have had will can may must should would could "
    "one two three four five six seven eight nine ten hundred thousand million"
).split()
_LINES = (
    "你好，世界。今天的天气很好。",
    "分布式推理需要可靠的通信。",
    "こんにちは、世界。",
    "안녕하세요 세계",
    "Привет, мир! Как дела?",
    "Grüße aus München, café crème, naïve façade.",
    "emoji: 🎉 🚀 ✨ 👍🏽 🧪",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}\n",
    '{"id": 17, "ok": true, "items": [1, 2, 3]}',
)


def corpus(lines: int = 20000, seed: int = 1234) -> list[str]:
    """Deterministic training text: sentences over a small vocabulary, numbers, punctuation, code,
    several scripts and emoji."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 10 == 0:
            out.append(rng.choice(_LINES))
            continue
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100000)))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice((".", ".", "!", "?", ";", ":"))
        if rng.random() < 0.1:
            text = "  " + text.replace(" ", "  ", 1)
        out.append(text)
    return out


def train_tokenizer(vocab_size: int, seed: int = 1234) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed=seed)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["\n", "\t"],
        hard_vocab_limit=False,
        num_threads=max(1, min(2, os.cpu_count() or 1)),
        minloglevel=2,
    )
    return model.getvalue()


def build_demo(path: str | Path, preset: str = "demo", seed: int = 0) -> Path:
    """Write the checkpoint directory ``path`` (atomically: a partial build never appears there)."""
    from safetensors.torch import save_file

    from engine.config import ModelConfig
    from engine.model import CausalLM, Part

    shape = PRESETS[preset]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        sp_model = train_tokenizer(shape["vocab_size"])
        (tmp / "tokenizer.model").write_bytes(sp_model)
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=sp_model)
        # the tokenizer learns as many pieces as the corpus supports (up to vocab_size); the model's
        # vocabulary is that rounded up to a multiple of 128, as real checkpoints pad theirs
        vocab = -(-sp.get_piece_size() // 128) * 128
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **shape,
            "vocab_size": vocab,
            "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": sp.bos_id(),
            "eos_token_id": sp.eos_id(),
            "dtype": "float32",
            "ringleader_demo_version": VERSION,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}, indent=2) + "\n"
        )
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "model_max_length": shape["max_position_embeddings"],
                },
                indent=2,
            )
            + "\n"
        )
        with torch.device("meta"):
            model = CausalLM(ModelConfig.from_dict(config), max_len=1)
        layout = model.checkpoint_layout()
        shapes = {}
        for name, p in model.named_parameters():
            parts = layout[name].parts if name in layout else [Part(name, tuple(p.shape))]
            shapes.update((part.name, part.shape) for part in parts)
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                state[name] = torch.ones(shape)
            else:
                state[name] = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_demo_dir(preset: str = "demo") -> Path:
    """Where a preset is built by default: $RINGLEADER_HOME (~/.cache/ringleader)/PRESET-vVERSION."""
    home = os.environ.get("RINGLEADER_HOME") or Path.home() / ".cache" / "ringleader"
    return Path(home) / f"{preset}-v{VERSION}"


def ensure_demo(path: str | Path | None = None, preset: str = "demo") -> Path:
    """The demo checkpoint directory, built on first use."""
    path = Path(path) if path else default_demo_dir()
    if not (path / "model.safetensors").is_file():
        print(f"building the demo checkpoint in {path} ...", file=sys.stderr)
        build_demo(path, preset)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help=f"output directory (default: {default_demo_dir()})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    args = parser.parse_args(argv)
    path = Path(args.path) if args.path else default_demo_dir()
    if args.force or not (path / "model.safetensors").is_file():
        build_demo(path, args.preset, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
