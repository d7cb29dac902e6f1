"""Model hyperparameters read from a Hugging Face ``config.json``, and ``generation_config.json``.

``ModelConfig`` is the only thing the model code looks at. ``ModelConfig.from_hf`` accepts both the
older layout (top-level ``rope_theta`` / ``rope_scaling`` / ``torch_dtype``) and the one written by
transformers 5 (``rope_parameters`` / ``dtype``), and refuses anything it cannot run with a message
that names the file and the key. Keys that the transformers model code of a supported architecture
does not read (``pretraining_tp``, ``pad_token_id``, ``use_cache``, ``initializer_range``, ...) do
not change the computation and are ignored, as transformers ignores them.

``GenerationConfig.from_hf`` reads the stop ids and the sampling defaults of
``generation_config.json``; ``ModelConfig.from_hf`` merges its stop ids into ``eos_token_ids``.
``resolve_dtype`` is the one place that turns ``--dtype`` (``auto`` by default) into the compute
dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import CheckpointError, RingleaderError


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
    default_partial_rotary: float = 1.0  # GLM: rotary on part of each head (partial_rotary_factor)
    partial_rotary: bool = False  # whether partial_rotary_factor is read; elsewhere it must be 1
    default_attention_bias: bool = False
    # How transformers applies config["sliding_window"]: "none" (the key is not read), "uniform"
    # (every layer, Mistral), or "layer_types" (only when use_sliding_window is true, on the layers
    # that layer_types or max_window_layers make sliding: Qwen2/Qwen3).
    sliding_window: str = "none"


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(qkv_bias=None, o_bias=None, mlp_bias_key="mlp_bias"),
    "MistralForCausalLM": Architecture(qkv_bias=False, o_bias=False, sliding_window="uniform"),
    "Qwen2ForCausalLM": Architecture(qkv_bias=True, o_bias=False, sliding_window="layer_types"),
    "Qwen3ForCausalLM": Architecture(qkv_bias=None, o_bias=None, qk_norm=True, sliding_window="layer_types"),
    "GlmForCausalLM": Architecture(
        qkv_bias=None,
        o_bias=False,
        fused_gate_up=True,
        rope_interleaved=True,
        default_partial_rotary=0.5,
        partial_rotary=True,
        default_attention_bias=True,
    ),
    "Glm4ForCausalLM": Architecture(
        qkv_bias=None,
        o_bias=False,
        fused_gate_up=True,
        sandwich_norm=True,
        rope_interleaved=True,
        default_partial_rotary=0.5,
        partial_rotary=True,
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

# the --dtype choices of `generate` and `serve`; "auto" is resolve_dtype's
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# config.json keys of checkpoints that the model code cannot run, and why (see _refuse_unsupported)
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
SOFTCAP_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")
QWEN_DEFAULT_SLIDING_WINDOW = 4096  # Qwen2Config / Qwen3Config's default for sliding_window
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
        """The config of a checkpoint directory: ``config.json``, with the stop ids of
        ``generation_config.json`` (when there is one) added to ``eos_token_ids``, in order."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found in the model directory")
        config = cls.from_dict(_read_json_object(path), where=str(path))
        extra = GenerationConfig.from_hf(model_dir).eos_token_ids
        config.eos_token_ids = list(dict.fromkeys([*config.eos_token_ids, *extra]))
        return config

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
        _refuse_unsupported(raw, where)

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
        if isinstance(partial, bool) or not isinstance(partial, (int, float)):
            raise CheckpointError(f"{where}: key 'partial_rotary_factor' must be a number, got {partial!r}")
        if partial != 1 and not arch.partial_rotary:
            raise CheckpointError(
                f"{where}: key 'partial_rotary_factor'={partial} is not supported for {name} (rotary "
                "embeddings on part of each head are a GLM feature)"
            )
        if not 0 < partial <= 1 or int(head_dim * partial) % 2:
            raise CheckpointError(
                f"{where}: partial_rotary_factor={partial} with head_dim={head_dim} does not give an even "
                "rotary dimension"
            )

        attention_bias = get("attention_bias", bool, arch.default_attention_bias)
        dtype_key = "dtype" if raw.get("dtype") is not None else "torch_dtype"
        dtype_name = raw.get(dtype_key) or "float32"
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CheckpointError(
                f"{where}: key {dtype_key!r}: dtype {dtype_name!r} is not supported ({', '.join(DTYPES)})"
            )

        eos_ids = token_ids(raw, "eos_token_id", where)
        bos_ids = token_ids(raw, "bos_token_id", where)

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
            sliding_windows=_sliding_windows(raw, arch, layers, where),
            dtype=DTYPES[dtype_name],
            bos_token_id=bos_ids[0] if bos_ids else None,
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


def _sliding_windows(raw: dict, arch: Architecture, layers: int, where: str) -> list[int | None]:
    """Per layer, the attention window (None: full attention), as transformers reads the keys."""
    if arch.sliding_window == "none":  # Llama, GLM: sliding_window is not read
        return [None] * layers
    window = raw.get("sliding_window")
    if arch.sliding_window == "layer_types":
        enabled = raw.get("use_sliding_window", False)
        if not isinstance(enabled, bool):
            raise CheckpointError(f"{where}: key 'use_sliding_window' must be a boolean, got {enabled!r}")
        if not enabled:  # Qwen2.5 publishes sliding_window (and max_window_layers) with this false
            return [None] * layers
        window = raw.get("sliding_window", QWEN_DEFAULT_SLIDING_WINDOW)
    if window is None:
        return [None] * layers
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise CheckpointError(f"{where}: key 'sliding_window' must be a positive integer, got {window!r}")
    if arch.sliding_window == "uniform":  # Mistral: every layer (transformers ignores layer_types)
        return [window] * layers
    layer_types = raw.get("layer_types")
    if layer_types is None:
        first = raw.get("max_window_layers", 28)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise CheckpointError(
                f"{where}: key 'max_window_layers' must be a non-negative integer, got {first!r}"
            )
        return [window if i >= first else None for i in range(layers)]
    if not isinstance(layer_types, list) or len(layer_types) != layers:
        count = len(layer_types) if isinstance(layer_types, list) else layer_types
        raise CheckpointError(
            f"{where}: key 'layer_types' must list one type per layer ({layers}), got {count!r}"
        )
    unknown = [t for t in layer_types if t not in ("full_attention", "sliding_attention")]
    if unknown:
        raise CheckpointError(
            f"{where}: key 'layer_types' has layer type {unknown[0]!r} (supported: 'full_attention', "
            "'sliding_attention')"
        )
    return [window if t == "sliding_attention" else None for t in layer_types]


def _refuse_unsupported(raw: dict, where: str) -> None:
    """Refuse, by name, the config.json keys that change the computation in a way the model code
    does not implement: quantized weights, mixture-of-experts layers, logit soft-capping."""
    quant = raw.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise CheckpointError(
            f"{where}: key 'quantization_config'{f' (quant_method {method!r})' if method else ''}: "
            "quantized checkpoints are not supported; use the bfloat16/float16/float32 checkpoint "
            "(--quantize int8 quantizes its weights at load)"
        )
    for key in MOE_KEYS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value > 0):
            raise CheckpointError(
                f"{where}: key {key!r}={value!r}: mixture-of-experts models are not supported"
            )
    for key in SOFTCAP_KEYS:
        if raw.get(key) is not None:
            raise CheckpointError(f"{where}: key {key!r}={raw[key]!r}: logit soft-capping is not supported")


def token_ids(raw: dict, key: str, where: str) -> list[int]:
    """``raw[key]`` as a list of token ids: Hugging Face writes one id, a list of them, or null."""
    value = raw.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(
            f"{where}: key {key!r} must be a token id or a list of token ids, got {value!r}"
        )
    return list(values)


def _read_json_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return raw


def _number(value, key: str, where: str, ok, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise CheckpointError(f"{where}: key {key!r} must be {what}, got {value!r}")
    return float(value)


def _top_k(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise CheckpointError(
            f"{where}: key {key!r} must be an integer >= 0 (or -1 for no limit), got {value!r}"
        )
    return value


# generation_config.json's sampling defaults: key -> check(value, key, where) -> the value to use
SAMPLING_DEFAULTS = {
    "temperature": lambda v, k, w: _number(v, k, w, lambda x: x >= 0, "a finite number >= 0"),
    "top_p": lambda v, k, w: _number(v, k, w, lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "top_k": _top_k,
    "repetition_penalty": lambda v, k, w: _number(v, k, w, lambda x: x > 0, "a finite number > 0"),
}


@dataclass
class GenerationConfig:
    """What ``generation_config.json`` says about inference: its stop ids, and the sampling
    defaults it sets (only those of ``SAMPLING_DEFAULTS`` that the file sets; a null is unset).

    As in vLLM, a default is taken whenever the file sets it, also next to ``do_sample: false``
    (with which transformers would decode greedily). Every other key (do_sample, max_length,
    pad_token_id, ...) is ignored.
    """

    eos_token_ids: list[int] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> GenerationConfig:
        """The generation config of a checkpoint directory; an empty one without the file."""
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        return cls.from_dict(_read_json_object(path), where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "generation_config.json") -> GenerationConfig:
        defaults = {
            key: check(raw[key], key, where)
            for key, check in SAMPLING_DEFAULTS.items()
            if raw.get(key) is not None
        }
        return cls(token_ids(raw, "eos_token_id", where), defaults)


def default_device() -> torch.device:
    """The device a model runs on when none is named: the first GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(
    dtype: str | torch.dtype | None, config: ModelConfig, device: str | torch.device | None = None
) -> torch.dtype:
    """The compute dtype for a ``--dtype`` choice (``DTYPE_CHOICES``) or a torch dtype.

    ``auto`` (or None) is the checkpoint's dtype (config.json's ``dtype``/``torch_dtype``) on an
    accelerator, and float32 on a CPU, where bfloat16 and float16 arithmetic is slower and rounds
    every step (the weights are converted as they are read).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        device = torch.device(device) if device is not None else default_device()
        return torch.float32 if device.type == "cpu" else config.dtype
    if dtype not in DTYPE_CHOICES:
        raise RingleaderError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


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
