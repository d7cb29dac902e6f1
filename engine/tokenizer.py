"""The tokenizer of a checkpoint directory, and incremental detokenization.

This is the only place where the engine meets text. ``load_tokenizer(model_dir)`` decides the
backend, as transformers does: ``tokenizer.json`` through the ``tokenizers`` library whenever the
file is there (byte-level BPE of Llama 3, Qwen and GLM-4; the Metaspace BPE that Llama 2 and
Mistral publish as fast tokenizers), else the sentencepiece ``tokenizer.model``. Both read the
same ``tokenizer_config.json`` settings (special tokens given as strings or as objects,
``add_bos_token``, ``added_tokens_decoder``) and find the chat templates the same way
(``chat_template.jinja``, ``additional_chat_templates/``, or ``chat_template`` in
tokenizer_config.json as a string or a list of named templates).

Callers see only ``Tokenizer``: encode, decode, special-token lookup, the vocabulary size, bos and
eos, the chat templates and the variables a template is rendered with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine.errors import CheckpointError

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)
REPLACEMENT = "\ufffd"


def load_tokenizer(model_dir: str | Path, model_vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of ``model_dir``: tokenizer.json when present, else tokenizer.model. With
    ``model_vocab_size`` (config.json's), a tokenizer with ids past the model's embedding is refused."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        tok: Tokenizer = HFTokenizer(model_dir)
    elif (model_dir / "tokenizer.model").is_file():
        tok = SentencePieceTokenizer(model_dir)
    else:
        raise CheckpointError(f"{model_dir}: no tokenizer.json or tokenizer.model in the model directory")
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise CheckpointError(
            f"{tok.path}: the tokenizer has {tok.vocab_size} tokens, more than the model's embedding holds "
            f"(vocab_size={model_vocab_size} in config.json)"
        )
    return tok


def has_tokenizer(model_dir: str | Path) -> bool:
    model_dir = Path(model_dir)
    return (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


def _token_content(value, where: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken object
    (``{"content": ..., "__type": "AddedToken"}``) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{where}: expected a string or an object with 'content', got {value!r}")


class Settings:
    """What tokenizer_config.json (with special_tokens_map.json and the template files) says."""

    def __init__(self, model_dir: Path):
        self.path = model_dir / "tokenizer_config.json"
        raw = _read_json(self.path) if self.path.is_file() else {}
        special_map_path = model_dir / "special_tokens_map.json"
        special_map = _read_json(special_map_path) if special_map_path.is_file() else {}
        self.raw = raw
        self.special: dict[str, str | None] = {}
        # as transformers: special_tokens_map.json counts only without added_tokens_decoder
        fallback = special_map if "added_tokens_decoder" not in raw else {}
        for key in SPECIAL_TOKEN_KEYS:
            if key in raw:
                self.special[key] = _token_content(raw[key], f"{self.path}: key {key!r}")
            elif key in fallback:
                self.special[key] = _token_content(fallback[key], f"{special_map_path}: key {key!r}")
        for key in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces"):
            if key in raw and not isinstance(raw[key], bool):
                raise CheckpointError(f"{self.path}: key {key!r} must be true or false, got {raw[key]!r}")
        self.add_bos: bool | None = raw.get("add_bos_token")
        self.add_eos: bool | None = raw.get("add_eos_token")
        self.clean_up_spaces = bool(raw.get("clean_up_tokenization_spaces", False))
        self.tokenizer_class = raw.get("tokenizer_class")
        decoder = raw.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise CheckpointError(f"{self.path}: key 'added_tokens_decoder' must be an object")
        self.added: dict[int, tuple[str, bool]] = {}
        for key, value in decoder.items():
            content = _token_content(value, f"{self.path}: added_tokens_decoder[{key!r}]")
            if not key.isdigit() or content is None:
                raise CheckpointError(f"{self.path}: added_tokens_decoder[{key!r}] is not an id and a token")
            self.added[int(key)] = (
                content,
                bool(value.get("special", True)) if isinstance(value, dict) else True,
            )
        self.templates, self.template_source = _chat_templates(model_dir, raw, self.path)


def _chat_templates(model_dir: Path, raw: dict, config_path: Path) -> tuple[dict[str, str], str | None]:
    """Named chat templates and the file they came from, in transformers' order of precedence:
    chat_template.jinja (plus additional_chat_templates/NAME.jinja), then tokenizer_config.json."""
    jinja = model_dir / "chat_template.jinja"
    extra_dir = model_dir / "additional_chat_templates"
    templates: dict[str, str] = {}
    source = None
    if jinja.is_file():
        templates["default"] = _read_template(jinja)
        source = str(jinja)
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.stem] = _read_template(path)
            source = source or str(extra_dir)
    if templates:
        return templates, source
    value = raw.get("chat_template")
    if value is None:
        return {}, None
    if isinstance(value, str):
        return {"default": value}, str(config_path)
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in value
    ):
        return {t["name"]: t["template"] for t in value}, str(config_path)
    raise CheckpointError(
        f"{config_path}: key 'chat_template' must be a string or a list of {{'name', 'template'}} objects"
    )


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the chat template ({e})") from None


class Tokenizer:
    """The interface every backend implements. Ids are those of the checkpoint's vocabulary;
    ``vocab_size`` counts every id the tokenizer can produce (added tokens included)."""

    backend: str
    path: Path  # the file the tokenizer was read from
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    special_ids: frozenset[int]
    settings: Settings
    # byte tokens whose runs decode as a whole (a byte-fallback decoder writes an invalid run as
    # one U+FFFD per byte, valid characters in it included)
    run_byte_ids: frozenset[int] = frozenset()
    byte_piece_ids: frozenset[int] = frozenset()  # byte-fallback tokens (<0xE4>), of either backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, as transformers' ``decode`` writes it; ids past the tokenizer's
        vocabulary (a padded model vocabulary) contribute nothing."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes one token stands for (a byte-fallback token: its one byte; a byte-level token:
        its bytes, which may be part of a character); None for ids past the vocabulary."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """One token as log-probabilities show it: its text when its bytes are whole characters
        (a special token: its name); ``bytes:\\xe4\\xb8`` when they are not, or when it is a
        byte-fallback token (whose text alone would collide with the ordinary token of the same
        character); ``token_id:N`` for an id past the tokenizer's vocabulary."""
        data = self.token_bytes(token_id)
        if data is None:
            return f"token_id:{token_id}"
        if token_id not in self.byte_piece_ids:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    @property
    def bos_token(self) -> str | None:
        return self.settings.special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.settings.special.get("eos_token")

    @property
    def chat_templates(self) -> dict[str, str]:
        return self.settings.templates

    def special_tokens(self) -> dict[str, int]:
        """Every special token's text and id."""
        return {t: i for i in sorted(self.special_ids) if (t := self.id_to_token(i)) is not None}

    def template_variables(self) -> dict[str, str]:
        """The special tokens a chat template sees by name (``bos_token``, ``eos_token``, ...)."""
        return {k: v for k, v in self.settings.special.items() if v is not None}

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "file": str(self.path),
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token,
            "bos_token_id": self.bos_id,
            "eos_token": self.eos_token,
            "eos_token_id": self.eos_id,
            "adds_bos": self.encode("")[:1] == [self.bos_id] if self.bos_id is not None else False,
            "special_tokens": self.special_tokens(),
            "chat_templates": sorted(self.chat_templates),
            "chat_template_file": self.settings.template_source,
        }

    def _id_of(self, key: str) -> int | None:
        token = self.settings.special.get(key)
        return None if token is None else self.token_to_id(token)


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` through the ``tokenizers`` library, as transformers' fast tokenizers."""

    backend = "tokenizers"

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = model_dir / "tokenizer.json"
        try:
            self.tok = RustTokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception for every parse error
            raise CheckpointError(f"{self.path}: not a valid tokenizer.json ({e})") from None
        self.settings = s = Settings(model_dir)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        for token_id, (content, _) in s.added.items():
            if vocab.get(content) != token_id:
                actual = f"gives id {vocab[content]}" if content in vocab else "does not have"
                raise CheckpointError(
                    f"{s.path}: added_tokens_decoder gives id {token_id} to {content!r}, which "
                    f"{self.path} {actual}"
                )
        added = self.tok.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        specials = {t.content for t in added.values() if t.special}
        specials |= {c for c, special in s.added.values() if special}
        specials |= {v for v in s.special.values() if v is not None and v in vocab}
        self.special_ids = frozenset(vocab[t] for t in specials if t in vocab)
        self.bos_id, self.eos_id = self._id_of("bos_token"), self._id_of("eos_token")
        for key in ("bos_token", "eos_token"):
            if s.special.get(key) is not None and self._id_of(key) is None:
                raise CheckpointError(f"{s.path}: {key} {s.special[key]!r} is not a token of {self.path}")
        # the post-processor of tokenizer.json decides the BOS, as it is: with a tokenizer.json,
        # transformers ignores tokenizer_config.json's add_bos_token and add_eos_token
        byte_level = "ByteLevel" in _component(self.tok.pre_tokenizer) + _component(self.tok.decoder)
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else None
        if (s.tokenizer_class or "").removesuffix("Fast") == "LlamaTokenizer" and not byte_level:
            self._as_llama_tokenizer(model_dir)
        if "ByteFallback" in _component(self.tok.decoder):
            self.run_byte_ids = frozenset(i for t, i in vocab.items() if BYTE_PIECE.fullmatch(t))
        self.byte_piece_ids = self.run_byte_ids
        # transformers skips the clean-up for BPE models: it was made for WordPiece and corrupts BPE text
        self.clean_up = s.clean_up_spaces and type(self.tok.model).__name__ != "BPE"
        self.tok.no_truncation()
        self.tok.no_padding()

    def _as_llama_tokenizer(self, model_dir: Path) -> None:
        """transformers' LlamaTokenizer keeps tokenizer.json's vocabulary, merges, post-processor and
        added tokens but sets a pipeline of its own (models/llama/tokenization_llama.py): no
        normalizer, a Metaspace pre-tokenizer whose prepend scheme follows ``add_prefix_space`` and
        ``legacy``, and the sentencepiece-style decoder. Mistral checkpoints keep theirs."""
        from tokenizers import decoders, pre_tokenizers

        model_type = None
        config_path = model_dir / "config.json"
        if config_path.is_file():
            model_type = _read_json(config_path).get("model_type")
        if model_type == "mistral":
            return
        raw = self.settings.raw
        add_prefix = raw.get("add_prefix_space")
        add_prefix = True if add_prefix is None else bool(add_prefix)
        scheme = ("always" if raw.get("legacy", False) else "first") if add_prefix else "never"
        self.tok.normalizer = None
        self.tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme=scheme, split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        self.tok.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] * add_prefix)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tok.decode(
            [i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=skip_special_tokens
        )
        return clean_up_tokenization(text) if self.clean_up else text

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None

    def token_bytes(self, token_id: int) -> bytes | None:
        token = self.id_to_token(token_id)
        if token is None:
            return None
        if token_id in self._added:
            return self._added[token_id].encode()
        if self._byte_of is not None:
            if all(c in self._byte_of for c in token):
                return bytes(self._byte_of[c] for c in token)
            return token.encode()
        if BYTE_PIECE.fullmatch(token):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` (when the directory has no tokenizer.json)."""

    backend = "sentencepiece"

    def __init__(self, model_dir: Path):
        import sentencepiece as spm

        self.path = model_dir / "tokenizer.model"
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: not a valid sentencepiece model ({e})") from None
        self.settings = s = Settings(model_dir)
        self.vocab_size = self.sp.get_piece_size()
        sp_bos, sp_eos = self.sp.bos_id(), self.sp.eos_id()
        for key, sp_id in (("bos_token", sp_bos), ("eos_token", sp_eos)):
            if key not in s.special and sp_id >= 0:
                s.special[key] = self.sp.id_to_piece(sp_id)
        self.bos_id, self.eos_id = self._id_of("bos_token"), self._id_of("eos_token")
        self.add_bos = (True if s.add_bos is None else s.add_bos) and self.bos_id is not None
        self.add_eos = bool(s.add_eos) and self.eos_id is not None
        controls = {i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self.byte_piece_ids = frozenset(i for i in range(self.vocab_size) if self.sp.is_byte(i))
        self.special_ids = frozenset(controls | {i for i in (self.bos_id, self.eos_id) if i is not None})
        # special tokens written in a text (a chat template's "<s>") are matched whole, as
        # transformers' tokenizers match added tokens
        texts = sorted((self.sp.id_to_piece(i) for i in self.special_ids), key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in texts if t)) if texts else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            ids += self.sp.encode(text[pos : m.start()]) if m.start() > pos else []
            ids.append(self.sp.piece_to_id(m.group()))
            pos = m.end()
        ids += self.sp.encode(text[pos:]) if pos < len(text) or not ids else []
        if add_special_tokens:
            ids = [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        parts, run = [], []
        for i in ids:
            if i in self.special_ids:
                parts += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self.sp.decode(run)])

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def token_bytes(self, token_id: int) -> bytes | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()


def _component(part) -> str:
    """One part of a tokenizer's pipeline (pre-tokenizer, decoder) as its JSON, without serialising
    the whole tokenizer and its vocabulary; "" for none."""
    return part.__getstate__().decode() if part is not None else ""


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's table (GPT-2's): each byte is written as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1)]
    printable += range(ord("\xae"), ord("\xff") + 1)
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a character.

    Each delta is the difference between decoding a short window of recent ids with and without
    the newest ones, so that context-dependent rules (a leading space dropped at the start of a
    text, bytes that join into one character) see the same context both times. Text that ends in
    an incomplete character (U+FFFD in the window's decoding) is held back until the character is
    complete; once three more tokens have come (each at least one byte, and a character lacks at
    most three) the bytes before them are settled, so the text up to there is handed out even when
    it holds bytes that never form a character, written as U+FFFD as the tokenizer writes them.
    The window never grows past a few tokens, so every push costs the same whatever the length;
    with a byte-fallback decoder (Llama 2, Mistral), which writes a run of byte tokens that is not
    valid UTF-8 as one U+FFFD per byte, a run is held until it ends and then decoded once.
    """

    CONTEXT = 6
    SETTLED_AFTER = 3  # tokens after which a byte's character is complete or never will be

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
        if not final and self._in_byte_run():
            return ""  # a run of byte-fallback tokens is decoded once it ends
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        end = len(self.ids)
        if after.endswith(REPLACEMENT) and not final:
            end -= self.SETTLED_AFTER
            if end <= self.read:
                return ""
            settled = self.tok.decode(self.ids[self.prefix : end])
            if not after.startswith(settled):
                return ""
            after = settled
        if len(after) <= len(before):
            return ""  # a skipped special token, or a character still incomplete
        delta = after[len(before) :]
        self.prefix, self.read = self.read, end
        self._trim()
        return delta

    def _in_byte_run(self) -> bool:
        """Whether the newest token that has text is a byte of a byte-fallback run (skipped special
        tokens and ids past the vocabulary do not end a run: their neighbours' bytes join)."""
        if not self.tok.run_byte_ids:
            return False
        for token_id in reversed(self.ids):
            if token_id not in self.tok.special_ids and 0 <= token_id < self.tok.vocab_size:
                return token_id in self.tok.run_byte_ids
        return False

    def _trim(self) -> None:
        if self.prefix > self.CONTEXT:
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0
