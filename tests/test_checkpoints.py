"""Checkpoints as the Hub publishes them: config.json of the Llama 3.2, Qwen2.5, Qwen3 and GLM-4
families, generation_config.json, bfloat16/float16 weights, shards and tied heads."""

import argparse
import copy
import json

import pytest
import torch

from engine.cli import build_parser
from engine.cli import main as cli_main
from engine.config import DTYPE_CHOICES, GenerationConfig, ModelConfig, resolve_dtype
from engine.errors import CheckpointError, RingleaderError
from engine.generate import Generator
from engine.loader import Checkpoint, read_header
from engine.request import SamplingParams

# config.json as published (hidden sizes shrunk; every other key as the Hub has it)
LLAMA_3_2 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
QWEN2_5 = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,  # of 3: layer 2 would slide, were use_sliding_window true
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3 = {  # as transformers 5 writes it: dtype, rope_parameters, layer_types
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "dtype": "float16",
    "eos_token_id": 151645,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 192,
    "layer_types": ["full_attention", "full_attention"],
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": None,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
    "sliding_window": None,
    "tie_word_embeddings": True,
    "transformers_version": "5.0.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GLM_4 = {
    "architectures": ["Glm4ForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338],
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 32768,
    "model_type": "glm4",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": 151329,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.3",
    "use_cache": True,
    "vocab_size": 151552,
}
PUBLISHED = {"llama-3.2": LLAMA_3_2, "qwen2.5": QWEN2_5, "qwen3": QWEN3, "glm-4": GLM_4}

EXPECTED = {
    "llama-3.2": dict(
        architecture="LlamaForCausalLM",
        head_dim=16,
        num_kv_heads=2,
        max_position_embeddings=131072,
        rope_type="llama3",
        rope_theta=500000.0,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        rotary_dim=16,
        qkv_bias=False,
        tie_word_embeddings=True,
        sliding_windows=[None, None],
        dtype=torch.bfloat16,
        bos_token_id=128000,
        eos_token_ids=[128001, 128008, 128009],
    ),
    "qwen2.5": dict(
        architecture="Qwen2ForCausalLM",
        head_dim=16,
        rope_type="default",
        rope_theta=1e6,
        qkv_bias=True,
        o_bias=False,
        tie_word_embeddings=False,
        sliding_windows=[None, None, None],
        dtype=torch.bfloat16,
        eos_token_ids=[151645],
    ),
    "qwen3": dict(
        architecture="Qwen3ForCausalLM",
        head_dim=32,
        rope_theta=1e6,
        qkv_bias=False,
        tie_word_embeddings=True,
        sliding_windows=[None, None],
        dtype=torch.float16,
        eos_token_ids=[151645],
    ),
    "glm-4": dict(
        architecture="Glm4ForCausalLM",
        head_dim=32,
        rotary_dim=16,
        partial_rotary_factor=0.5,
        qkv_bias=True,
        o_bias=False,
        bos_token_id=None,
        eos_token_ids=[151329, 151336, 151338],
        dtype=torch.bfloat16,
    ),
}


def _write(path, config=None, generation=None):
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(
            generation if isinstance(generation, str) else json.dumps(generation)
        )
    return path


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_published_configs_parse(family):
    config = ModelConfig.from_dict(copy.deepcopy(PUBLISHED[family]))
    for key, want in EXPECTED[family].items():
        assert getattr(config, key) == want, key


def _qwen(**changes):
    return {**copy.deepcopy(QWEN2_5), **changes}


SLIDING = {
    "qwen: use_sliding_window false": (_qwen(), [None, None, None]),
    "qwen: max_window_layers": (_qwen(use_sliding_window=True, sliding_window=64), [None, None, 64]),
    "qwen: layer_types": (
        _qwen(
            use_sliding_window=True,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        [64, None, 64],
    ),
    "qwen: layer_types, use_sliding_window false": (
        _qwen(layer_types=["sliding_attention"] * 3, sliding_window=64),
        [None, None, None],
    ),
    "qwen: default window": (
        {
            k: v
            for k, v in _qwen(use_sliding_window=True, max_window_layers=0).items()
            if k != "sliding_window"
        },
        [4096] * 3,
    ),
    "mistral: every layer, layer_types ignored": (
        _qwen(
            architectures=["MistralForCausalLM"],
            sliding_window=64,
            layer_types=["full_attention"] * 3,
        ),
        [64] * 3,
    ),
    "llama: sliding_window is not read": ({**copy.deepcopy(LLAMA_3_2), "sliding_window": 64}, [None, None]),
}


@pytest.mark.parametrize("case", sorted(SLIDING))
def test_sliding_windows_as_transformers_reads_them(case):
    import transformers

    raw, want = SLIDING[case]
    assert ModelConfig.from_dict(copy.deepcopy(raw)).sliding_windows == want
    if raw["architectures"][0].startswith("Qwen"):  # the same as transformers' own reading
        hf = transformers.Qwen2Config(**{k: v for k, v in raw.items() if k != "architectures"})
        assert [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types] == want


REFUSED = {
    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "num_experts": 64,
    "num_local_experts": 8,
    "n_routed_experts": 64,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "partial_rotary_factor": 0.5,  # on a Llama
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "layer_types": ["full_attention", "linear_attention"],
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_keys_that_change_the_computation_are_refused_by_name(tmp_path, key):
    raw = {**copy.deepcopy(LLAMA_3_2), key: REFUSED[key]}
    if key == "layer_types":
        raw.update(architectures=["Qwen3ForCausalLM"], use_sliding_window=True, sliding_window=64)
    _write(tmp_path, raw)
    with pytest.raises(CheckpointError) as e:
        ModelConfig.from_hf(tmp_path)
    message = str(e.value)
    assert str(tmp_path / "config.json") in message
    assert (key if key != "rope_scaling" else "yarn") in message


@pytest.mark.parametrize(
    "changes",
    [
        {"num_experts": 0, "n_routed_experts": None},
        {"quantization_config": None, "attn_logit_softcapping": None, "final_logit_softcapping": None},
        {"pretraining_tp": 2},  # transformers 5 no longer reads it (slices of the same matmuls)
        {"partial_rotary_factor": 1.0, "pad_token_id": 128004, "bos_token_id": [128000]},
    ],
)
def test_keys_that_do_not_change_the_computation_are_accepted(changes):
    config = ModelConfig.from_dict({**copy.deepcopy(LLAMA_3_2), **changes})
    assert config.rotary_dim == 16 and config.bos_token_id == 128000


@pytest.mark.parametrize(
    "config_eos, generation_eos, merged",
    [
        (128001, [128001, 128008, 128009], [128001, 128008, 128009]),
        ([151645, 151643], 151643, [151645, 151643]),
        (None, 2, [2]),
        (7, None, [7]),
    ],
)
def test_generation_config_stop_ids_are_merged(tmp_path, config_eos, generation_eos, merged):
    _write(tmp_path, {**QWEN2_5, "eos_token_id": config_eos}, {"eos_token_id": generation_eos})
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == merged


def test_generation_defaults_are_the_sampling_keys_the_file_sets(tmp_path):
    # Qwen2.5-Instruct's generation_config.json: with do_sample false transformers would decode
    # greedily, but (as vLLM) the defaults the file sets are taken
    qwen = {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": False,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "max_length": 32768,
        "transformers_version": "4.37.0",
    }
    gen = GenerationConfig.from_hf(_write(tmp_path / "qwen", generation=qwen))
    assert gen.eos_token_ids == [151645, 151643]
    assert gen.defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    llama = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009]}
    llama.update(temperature=1, top_p=0.9, top_k=None)
    gen = GenerationConfig.from_hf(_write(tmp_path / "llama", generation=llama))
    assert gen.defaults == {"temperature": 1.0, "top_p": 0.9}
    assert GenerationConfig.from_hf(tmp_path / "nowhere") == GenerationConfig([], {})


BAD_GENERATION = {
    "not json": ("{nope", "not valid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
    "temperature": ({"temperature": "hot"}, "'temperature'"),
    "negative temperature": ({"temperature": -0.5}, "'temperature'"),
    "top_p": ({"top_p": 1.5}, "'top_p'"),
    "top_k": ({"top_k": 2.5}, "'top_k'"),
    "repetition_penalty": ({"repetition_penalty": 0}, "'repetition_penalty'"),
    "eos list": ({"eos_token_id": [1, "2"]}, "'eos_token_id'"),
    "eos bool": ({"eos_token_id": True}, "'eos_token_id'"),
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATION))
def test_bad_generation_config_is_named(tmp_path, case):
    content, expected = BAD_GENERATION[case]
    _write(tmp_path, QWEN2_5, content)
    for read in (GenerationConfig.from_hf, ModelConfig.from_hf):
        with pytest.raises(CheckpointError) as e:
            read(tmp_path)
        assert str(tmp_path / "generation_config.json") in str(e.value) and expected in str(e.value)


def test_bad_stop_ids_in_config_json_are_named(tmp_path):
    _write(tmp_path, {**QWEN2_5, "eos_token_id": "</s>"})
    with pytest.raises(CheckpointError, match="config.json: key 'eos_token_id' must be a token id"):
        ModelConfig.from_hf(tmp_path)


def test_auto_dtype_is_the_checkpoints_on_a_gpu_and_float32_on_a_cpu():
    bf16 = ModelConfig.from_dict(copy.deepcopy(LLAMA_3_2))
    assert resolve_dtype("auto", bf16, "cpu") == torch.float32
    assert resolve_dtype(None, bf16, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", bf16, "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16", bf16, "cpu") == torch.float16
    assert resolve_dtype(torch.bfloat16, bf16, "cpu") == torch.bfloat16
    with pytest.raises(RingleaderError, match="'half'"):
        resolve_dtype("half", bf16, "cpu")
    from server.__main__ import build_parser as serve_parser

    for parser, argv in ((build_parser(), ["generate", "--prompt", "x"]), (serve_parser(), [])):
        assert tuple(_dtype_flag(parser).choices) == DTYPE_CHOICES
        assert parser.parse_args(argv).dtype == "auto"


def _dtype_flag(parser):
    for action in parser._actions:
        if "--dtype" in action.option_strings:
            return action
        if isinstance(action, argparse._SubParsersAction):
            return _dtype_flag(action.choices["generate"])
    raise AssertionError("no --dtype flag")


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p)
            )
    return model


# name -> (config.json, how the weights are published: dtype, max_shard_size or None)
PUBLISHED_WEIGHTS = {
    "llama-3.2": (LLAMA_3_2, torch.bfloat16, None),  # tied: no lm_head.weight
    "qwen2.5": (QWEN2_5, torch.bfloat16, "40KB"),  # many shards and an index with its metadata
    "qwen2.5-sliding": (_qwen(use_sliding_window=True, sliding_window=5), torch.bfloat16, None),
    "qwen3": (QWEN3, torch.float16, None),  # tied, float16
    "glm-4": (GLM_4, torch.bfloat16, "100KB"),
}


@pytest.fixture(scope="module", params=sorted(PUBLISHED_WEIGHTS))
def published(request, tmp_path_factory):
    """A random model of a published config.json, saved as the Hub has it (bfloat16 or float16,
    sharded or not), with that config.json in the published layout."""
    import transformers

    family = request.param
    published_config, dtype, shard = PUBLISHED_WEIGHTS[family]
    raw = {**copy.deepcopy(published_config), "vocab_size": 256}
    if "pad_token_id" in raw:
        raw["pad_token_id"] = 0
    path = tmp_path_factory.mktemp(family)
    (path / "config.json").write_text(json.dumps(raw))
    hf_config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _randomize(model, seed=7).to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    (path / "config.json").write_text(json.dumps(raw))  # as published, not as transformers 5 writes it
    return family, path


def test_published_weights_load_in_float32_on_cpu_and_match_transformers(published):
    import transformers

    family, path = published
    raw, dtype, shard = PUBLISHED_WEIGHTS[family]
    ckpt = Checkpoint(path)
    assert {t.dtype for t in ckpt.tensors.values()} == {dtype}
    tied = raw["tie_word_embeddings"]
    assert ("lm_head.weight" in ckpt.tensors) == (not tied)
    if shard:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert "total_size" in index["metadata"] and len(set(index["weight_map"].values())) > 1
        assert not (path / "model.safetensors").exists()

    gen = Generator.from_pretrained(path, with_tokenizer=False)
    assert gen.config.dtype == dtype
    assert {p.dtype for p in gen.model.parameters()} == {torch.float32}
    if raw.get("use_sliding_window"):  # the last layer slides over 5 tokens of the 13 + 6
        assert gen.config.sliding_windows == [None, None, 5]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    prompt = torch.randint(0, 256, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    (out,) = gen.generate([prompt], SamplingParams(max_tokens=6, temperature=0), record_logits=True)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
    assert (torch.stack(out.logits) - ref).abs().max().item() <= 1e-4
    assert out.token_ids == ref.argmax(-1).tolist()


@pytest.mark.parametrize("published", ["llama-3.2"], indirect=True)
def test_dtype_can_still_be_chosen(published):
    family, path = published
    gen = Generator.from_pretrained(path, dtype=torch.bfloat16, with_tokenizer=False)
    assert {p.dtype for p in gen.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("published", ["llama-3.2"], indirect=True)
def test_untied_checkpoint_without_its_head_is_named(published, tmp_path):
    family, path = published
    _write(tmp_path, {**json.loads((path / "config.json").read_text()), "tie_word_embeddings": False})
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    assert "lm_head.weight" not in read_header(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' is missing"):
        Generator.from_pretrained(tmp_path, with_tokenizer=False)


def test_info_errors_end_with_one_line(tmp_path, capsys):
    _write(tmp_path, QWEN2_5)
    assert cli_main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringleader: error: ") and "no model.safetensors" in err and err.count("\n") == 1
    _write(tmp_path, {**QWEN2_5, "num_experts": 8})
    assert cli_main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'num_experts'" in err and err.count("\n") == 1
