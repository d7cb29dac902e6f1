"""Checkpoint loading: sharded and unsharded, config layouts, and every bad-input case."""

import json
import shutil

import pytest
import torch
from hf_models import write_hf_checkpoint

from engine.cli import main as cli_main
from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.generate import Generator
from engine.kv_cache import ContiguousKVCache, make_step
from engine.loader import Checkpoint, read_header, read_tensor


def _logits(path):
    gen = Generator.from_pretrained(path, with_tokenizer=False)
    x = torch.arange(1, 20)[None]
    cfg = gen.config
    cache = ContiguousKVCache(gen.model.layer_ids, 1, 32, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    with torch.inference_mode():
        return gen.model(x, make_step(x, [0], [0], gen.windows), cache)


def test_sharded_and_unsharded_checkpoints_give_identical_logits(tmp_path):
    write_hf_checkpoint("qwen3", tmp_path / "one", seed=5)
    write_hf_checkpoint("qwen3", tmp_path / "many", seed=5, max_shard_size="60KB")
    shards = list((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(tmp_path / "one"), _logits(tmp_path / "many"))


def test_slices_read_only_what_they_name(tmp_path):
    from safetensors.torch import save_file

    t = torch.arange(6 * 10 * 4, dtype=torch.float32).reshape(6, 10, 4)
    save_file({"t": t, "b": t.to(torch.bfloat16)}, str(tmp_path / "x.safetensors"))
    infos = read_header(tmp_path / "x.safetensors")
    assert torch.equal(read_tensor(infos["t"]), t)
    assert torch.equal(read_tensor(infos["t"], 0, 2, 5), t[2:5])
    assert torch.equal(read_tensor(infos["t"], 1, 3, 7), t[:, 3:7])
    assert torch.equal(read_tensor(infos["b"], 2, 1, 3), t.to(torch.bfloat16)[:, :, 1:3])


def test_both_config_layouts_are_read_alike():
    new = {
        "architectures": ["GlmForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "head_dim": 16,
        "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5},
    }
    old = {k: v for k, v in new.items() if k not in ("dtype", "rope_parameters")}
    old.update(torch_dtype="bfloat16", rope_theta=5e5, partial_rotary_factor=0.5)
    a, b = ModelConfig.from_dict(new), ModelConfig.from_dict(old)
    assert a == b
    assert a.rope_theta == 5e5 and a.dtype == torch.bfloat16 and a.rotary_dim == 8


@pytest.fixture()
def ckpt(tmp_path, tiny_demo):
    path = tmp_path / "m"
    shutil.copytree(tiny_demo, path)
    return path


def _run_cli(capsys, *args):
    code = cli_main(["generate", *args])
    err = capsys.readouterr().err
    return code, err


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


BAD_CHECKPOINTS = {
    "unsupported architecture": (
        lambda p: _edit_config(p, architectures=["GPT2LMHeadModel"]),
        "GPT2LMHeadModel",
    ),
    "missing config": (lambda p: (p / "config.json").unlink(), "config.json not found"),
    "config not json": (lambda p: (p / "config.json").write_text("{nope"), "not valid JSON"),
    "missing weights": (lambda p: (p / "model.safetensors").unlink(), "no model.safetensors"),
    "missing tokenizer": (lambda p: (p / "tokenizer.model").unlink(), "no tokenizer.json or tokenizer.model"),
    "corrupt tokenizer.json": (
        lambda p: (p / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}'),
        "tokenizer.json: not a valid tokenizer.json",
    ),
    "tokenizer larger than the embedding": (
        lambda p: _edit_config(p, vocab_size=50),
        "more than the model's embedding holds (vocab_size=50 in config.json)",
    ),
    "shape mismatch": (lambda p: _edit_config(p, intermediate_size=100), "config.json implies"),
    "wrong type": (lambda p: _edit_config(p, hidden_size="64"), "'hidden_size' must be int"),
    "generation config wrong type": (
        lambda p: (p / "generation_config.json").write_text('{"top_p": "0.9"}'),
        "generation_config.json: key 'top_p' must be a number in (0, 1]",
    ),
    "mixture of experts": (lambda p: _edit_config(p, num_local_experts=8), "'num_local_experts'=8"),
    "truncated": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]),
        "truncated",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_ends_with_one_clear_message(ckpt, capsys, case):
    damage, expected = BAD_CHECKPOINTS[case]
    damage(ckpt)
    code, err = _run_cli(capsys, "--model", str(ckpt), "--prompt", "hi", "--json")
    assert code == 2
    assert expected in err and str(ckpt) in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_missing_shard_and_missing_tensor_are_named(tmp_path):
    path = tmp_path / "sharded"
    write_hf_checkpoint("llama", path, max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shard}', which is missing"):
        Checkpoint(path)
    write_hf_checkpoint("llama", tmp_path / "again", max_shard_size="60KB")
    index = json.loads((tmp_path / "again" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    (tmp_path / "again" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
        Checkpoint(tmp_path / "again")


BAD_REQUESTS = {
    "prompt over the context": (
        ["--prompt-ids", ",".join(["5"] * 500), "--max-tokens", "20"],
        "context length",
    ),
    "temperature": (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    "top_p": (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    "max_tokens": (["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
    "token id": (["--prompt-ids", "1,99999"], "99999"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_ends_with_one_clear_message(tiny_demo, capsys, case):
    args, expected = BAD_REQUESTS[case]
    code, err = _run_cli(capsys, "--model", str(tiny_demo), *args)
    assert code == 2
    assert expected in err and "Traceback" not in err and err.count("\n") == 1


def test_generate_and_serve_name_a_missing_tokenizer_alike(ckpt, capsys):
    from server.__main__ import main as serve_main

    (ckpt / "tokenizer.model").unlink()
    code, generate_err = _run_cli(capsys, "--model", str(ckpt), "--prompt", "hi")
    assert code == 2
    assert serve_main(["--model", str(ckpt), "--port", "1"]) == 2
    serve_err = capsys.readouterr().err
    assert generate_err == serve_err and "no tokenizer.json or tokenizer.model" in serve_err
