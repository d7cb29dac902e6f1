"""The launch script and the generation CLI as people and scripts run them: real processes."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _launch(*args, home=None, timeout=300):
    env = {**os.environ, "RINGLEADER_PYTHON": sys.executable}
    if home is not None:
        env["RINGLEADER_HOME"] = str(home)
    return subprocess.run(
        [str(ROOT / "launch.sh"), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd="/"
    )


def test_generate_json_is_reproducible_and_consistent(tiny_demo):
    args = ["generate", "--model", str(tiny_demo), "--prompt", "The ring sends", "--max-tokens", "12"]
    args += ["--temperature", "0.9", "--seed", "42", "--ignore-eos", "--json"]
    first = _launch(*args)
    assert first.returncode == 0, first.stderr
    record = json.loads(first.stdout)
    assert len(record["token_ids"]) == 12 and record["finish_reason"] == "length"
    assert record["usage"]["completion_tokens"] == 12
    assert record["usage"]["prompt_tokens"] == len(record["prompt_token_ids"])
    again = json.loads(_launch(*args).stdout)
    assert again["token_ids"] == record["token_ids"] and again["text"] == record["text"]


def test_prompt_ids_and_greedy(tiny_demo):
    run = _launch(
        "generate",
        "--model",
        str(tiny_demo),
        "--prompt-ids",
        "1,5,9,200",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["prompt_token_ids"] == [1, 5, 9, 200] and len(record["token_ids"]) == 5


def test_bad_flag_and_bad_model_fail_cleanly(tmp_path):
    run = _launch("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x")
    assert run.returncode == 2
    assert "nowhere" in run.stderr and "Traceback" not in run.stderr
    run = _launch("frobnicate")
    assert run.returncode == 2 and "unknown command" in run.stderr


def test_plain_launch_builds_the_demo_and_serves_it(tmp_path):
    import openai
    from servers import LaunchedServer

    from engine.demo import VERSION

    server = LaunchedServer(plain=True, env={"RINGLEADER_HOME": str(tmp_path)}, ready_timeout=300)
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
        name = f"demo-v{VERSION}"
        assert [m.id for m in client.models.list().data] == [name]
        out = client.completions.create(model=name, prompt="Hello", max_tokens=8)
        assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")
    finally:
        code, err = server.stop()
    assert code == 0, err
    assert (tmp_path / f"demo-v{VERSION}" / "model.safetensors").is_file()
    assert f"serving '{name}' at {server.base}" in err


def test_info_reports_the_host():
    run = _launch("info")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["cpu_cores"] >= 1 and info["memory_total_bytes"] > 0
    assert isinstance(info["gpus"], list)
    assert (info["nvml_error"] is None) or info["gpus"] == []


def test_a_failing_nvml_is_reported_not_raised(monkeypatch):
    import pynvml

    from engine import hardware

    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    gpus, why = hardware.gpus()
    assert gpus == [] and "NVML unavailable" in why
    assert hardware.describe()["gpus"] == []


def test_info_describes_a_checkpoint_as_published(tiny_demo, tmp_path):
    """A bfloat16, sharded, tied-head checkpoint with the demo's tokenizer and generation defaults:
    ``info --model`` says what was detected, reading only the files' headers."""
    import shutil

    import torch
    from hf_models import make_hf_model

    demo = json.loads((tiny_demo / "config.json").read_text())
    model = make_hf_model("llama-mqa-tied", vocab_size=demo["vocab_size"], bos_token_id=1, eos_token_id=2)
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny_demo / name, tmp_path / name)
    generation = {
        "do_sample": True,
        "eos_token_id": [2, 5],
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": 99,
    }
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))

    run = _launch("info", "--model", str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["config_dtype"] == "bfloat16"
    auto = "float32" if info["auto_dtype"]["device"] == "cpu" else "bfloat16"
    assert info["auto_dtype"]["dtype"] == auto
    params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    assert info["parameters"] == params == info["weights"]["parameters"]
    assert (info["layers"], info["heads"], info["kv_heads"], info["head_dim"]) == (2, 4, 1, 16)
    assert info["vocab_size"] == demo["vocab_size"] and info["max_position_embeddings"] == 256
    assert info["rope"]["type"] == "default" and info["tie_word_embeddings"] is True
    assert info["sliding_windows"] == {"full_attention_layers": 2, "sliding_attention_layers": {}}
    files = info["weights"]["files"]
    assert len(files) > 1 and all(f["dtypes"] == {"bfloat16": f["tensors"]} for f in files)
    assert sorted(f["file"] for f in files) == sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert info["stop_token_ids"] == [2, 5]
    assert info["generation_defaults"] == {"temperature": 0.6, "top_p": 0.9}
    tok = info["tokenizer"]
    assert tok["backend"] == "sentencepiece" and tok["eos_token_id"] == 2 and tok["bos_token_id"] == 1
    assert tok["file"] == str(tmp_path / "tokenizer.model")


def test_the_bench_script_runs_a_benchmark_as_benchmarks_md_writes_it():
    """``scripts/bench.sh`` runs any script of benchmarks/ (here the quick planner) with the bench
    extras; a benchmark file named like a standard-library module would break every one of them."""
    env = {**os.environ, "RINGLEADER_PYTHON": sys.executable}
    run = subprocess.run(
        [str(ROOT / "scripts" / "bench.sh"), "benchmarks/plan.py"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd="/",
    )
    assert run.returncode == 0, run.stderr
    assert "1024" in run.stdout
    stdlib = set(sys.stdlib_module_names)
    assert not [p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem in stdlib]
