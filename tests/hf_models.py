"""Tiny random checkpoints written by transformers itself, for parity tests."""

from __future__ import annotations

import torch

TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# name -> (transformers config class name, extra config keys)
CASES = {
    "llama": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "llama-mqa-tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=97)),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            max_position_embeddings=512,
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=12, head_dim=24)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    "glm": ("GlmConfig", dict(head_dim=16, pad_token_id=0)),
    "glm4": ("Glm4Config", dict(head_dim=32, pad_token_id=0, num_key_value_heads=1)),
}


def make_hf_model(case: str, seed: int = 0, **overrides):
    """A transformers model of the named case with every parameter randomised (biases and norms too)."""
    import transformers

    cls_name, extra = CASES[case]
    kwargs = {**TINY, **extra, **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    # greedy parity compares raw argmax over 32 tokens: let transformers' generate run past EOS
    # instead of suppressing it (min_new_tokens) or stopping on it
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def write_hf_checkpoint(case: str, path, seed: int = 0, max_shard_size=None, **overrides):
    model = make_hf_model(case, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model
