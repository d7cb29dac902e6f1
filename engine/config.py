"""Model hyperparameters read from a Hugging Face ``config.json``.

``ModelConfig`` is the only thing the model code looks at. ``ModelConfig.from_hf`` accepts both the
older layout (top-level ``rope_theta`` / ``rope_scaling`` / ``torch_dtype``) and the one written by
transformers 5 (``rope_parameters`` / ``dtype``), and refuses anything it cannot run with a message
that names the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import CheckpointError


@dataclass(frozen=True)
class Architecture:
    """What distinguishes one supported model family from another."""

    qkv_bias: bool | None  # None: read config["attention_bias"]
    o_bias: bool | None  # None: read config["attention_bias"]
    mlp_bias_key: str | None = None  # config key that turns on MLP biases (Llama's "mlp_bias")
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3)
    fused_gate_up: bool = False  # one gate_up_proj weight instead of gate_proj + up_proj (GLM)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (GLM-4)
    rope_interleaved: bool = False  # rotary pairs are (2i, 2i+1), not (i, i + d/2) (GLM)
    default_partial_rotary: float = 1.0
    default_attention_bias: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(qkv_bias=None, o_bias=None, mlp_bias_key="mlp_bias"),
    "MistralForCausalLM": Architecture(qkv_bias=False, o_bias=False),
    "Qwen2ForCausalLM": Architecture(qkv_bias=True, o_bias=False),
    "Qwen3ForCausalLM": Architecture(qkv_bias=None, o_bias=None, qk_norm=True),
    "GlmForCausalLM": Architecture(
        qkv_bias=None,
        o_bias=False,
        fused_gate_up=True,
        rope_interleaved=True,
        default_partial_rotary=0.5,
        default_attention_bias=True,
    ),
    "Glm4ForCausalLM": Architecture(
        qkv_bias=None,
        o_bias=False,
        fused_gate_up=True,
        sandwich_norm=True,
        rope_interleaved=True,
        default_partial_rotary=0.5,
        default_attention_bias=True,
    ),
}

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_BASE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict = field(default_factory=dict)
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Per layer: None for full attention, else the window size in tokens.
    sliding_windows: list[int | None] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found in the model directory")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        name = archs[0] if isinstance(archs, list) and archs else None
        if name not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise CheckpointError(
                f"{where}: unsupported architecture {name!r} (key 'architectures'); supported: {supported}"
            )
        arch = ARCHITECTURES[name]

        def get(key, kind, default=None, required=False):
            if key not in raw or raw[key] is None:
                if required:
                    raise CheckpointError(f"{where}: required key {key!r} is missing")
                return default
            value = raw[key]
            ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise CheckpointError(
                    f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}"
                )
            return value

        hidden = get("hidden_size", int, required=True)
        heads = get("num_attention_heads", int, required=True)
        kv_heads = get("num_key_value_heads", int, heads)
        layers = get("num_hidden_layers", int, required=True)
        head_dim = get("head_dim", int, None) or (hidden // heads if heads else 0)
        for key, value in (
            ("hidden_size", hidden),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("num_hidden_layers", layers),
            ("head_dim", head_dim),
        ):
            if value <= 0:
                raise CheckpointError(f"{where}: key {key!r} must be positive, got {value}")
        if heads % kv_heads:
            raise CheckpointError(
                f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")

        rope = _rope_parameters(raw, where)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"{where}: rope type {rope_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
        if partial is None:
            partial = arch.default_partial_rotary
        if not 0 < partial <= 1 or int(head_dim * partial) % 2:
            raise CheckpointError(
                f"{where}: partial_rotary_factor={partial} with head_dim={head_dim} does not give an even "
                "rotary dimension"
            )

        attention_bias = get("attention_bias", bool, arch.default_attention_bias)
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{where}: dtype {dtype_name!r} is not supported ({', '.join(DTYPES)})")

        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

        return cls(
            architecture=name,
            vocab_size=get("vocab_size", int, required=True),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int, required=True),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=get("max_position_embeddings", int, 4096),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_scaling={k: v for k, v in rope.items() if k not in _ROPE_BASE_KEYS},
            partial_rotary_factor=float(partial),
            qkv_bias=attention_bias if arch.qkv_bias is None else arch.qkv_bias,
            o_bias=attention_bias if arch.o_bias is None else arch.o_bias,
            mlp_bias=bool(raw.get(arch.mlp_bias_key, False)) if arch.mlp_bias_key else False,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            sliding_windows=_sliding_windows(raw, name, layers, where),
            dtype=DTYPES[dtype_name],
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def param_count(self) -> int:
        """Number of parameters of the whole model (embeddings counted once when tied)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        attn += 2 * self.head_dim * self.arch.qk_norm
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        norms = (4 if self.arch.sandwich_norm else 2) * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + norms) + embed + h


def _rope_parameters(raw: dict, where: str) -> dict:
    """Merge transformers 5's ``rope_parameters`` with the older ``rope_theta``/``rope_scaling`` keys."""
    rope: dict = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: key {key!r} must be an object, got {value!r}")
        if "full_attention" in value or "sliding_attention" in value:
            raise CheckpointError(f"{where}: per-layer-type {key!r} is not supported")
        rope.update(value)
    if "rope_theta" not in rope and "rope_theta" in raw:
        rope["rope_theta"] = raw["rope_theta"]
    theta = rope.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    if rope.get("rope_type", rope.get("type", "default")) in ("linear", "llama3"):
        factor = rope.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise CheckpointError(f"{where}: rope scaling needs a positive 'factor', got {factor!r}")
    return rope


def _sliding_windows(raw: dict, name: str, layers: int, where: str) -> list[int | None]:
    window = raw.get("sliding_window")
    if name.startswith("Qwen") and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return [None] * layers
    if not isinstance(window, int) or window <= 0:
        raise CheckpointError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    layer_types = raw.get("layer_types")
    if layer_types is None and name.startswith("Qwen"):
        first = raw.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if layer_types is None:
        return [window] * layers
    if len(layer_types) != layers:
        raise CheckpointError(f"{where}: layer_types has {len(layer_types)} entries for {layers} layers")
    return [window if t == "sliding_attention" else None for t in layer_types]


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding and the scale applied to cos/sin."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    params = config.rope_scaling
    if config.rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif config.rope_type == "llama3":
        factor = params["factor"]
        low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        old_ctx = params.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq, 1.0
