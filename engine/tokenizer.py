"""Sentencepiece tokenizer of a checkpoint directory, and incremental detokenization.

This is the only place where the engine meets text.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from engine.errors import CheckpointError


class Tokenizer:
    """``tokenizer.model`` plus the few settings of ``tokenizer_config.json`` that matter here."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.model"
        if not path.is_file():
            raise CheckpointError(f"{path}: sentencepiece tokenizer.model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a valid sentencepiece model ({e})") from None
        settings = {}
        config_path = model_dir / "tokenizer_config.json"
        if config_path.is_file():
            try:
                settings = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = bool(settings.get("add_bos_token", True)) and self.bos_id is not None
        self.chat_template = settings.get("chat_template")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.sp.encode(text)
        with_bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_id, *ids] if with_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; ids outside the tokenizer's vocabulary (a padded model vocabulary) and
        control tokens (bos, eos) contribute nothing."""
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def piece(self, token_id: int) -> str:
        """One token as it reads inside a text (for log-probabilities): the word-boundary mark is a
        space; byte-fallback pieces stay as written (``<0xE4>``); ids past the tokenizer's
        vocabulary read as empty."""
        if not 0 <= token_id < self.vocab_size:
            return ""
        return self.sp.id_to_piece(token_id).replace("\u2581", " ")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a character.

    Each delta is the difference between decoding a short window of recent ids with and without the
    newest ones, so leading-space rules of the tokenizer see the same context both times; text that
    ends in an incomplete UTF-8 sequence (byte-fallback pieces, U+FFFD when decoded) is held back
    until the character is complete.
    """

    CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT :])
        self.prefix = 0  # ids[prefix:read] is text already emitted, kept as context
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of a sequence."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return delta
