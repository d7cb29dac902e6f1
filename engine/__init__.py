"""One model replica: config, model, checkpoint loader, tokenizer, KV cache, sampler, generation.

The engine knows token ids; text enters and leaves only through ``engine.tokenizer``.
"""
