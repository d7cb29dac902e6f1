"""Helpers that the tests and the benchmarks share, never imported by the runtime: servers started
by ``./launch.sh`` on loopback (``processes``), emulated clusters under load (``cluster``) and
Hugging Face tokenizer directories written as checkpoints publish them (``hf_tokenizers``).
They need a checkout (``launch.sh``) and the test or bench extras (``openai``, ``psutil``)."""
