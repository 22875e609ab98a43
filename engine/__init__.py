"""specray's engine: pure torch, no Ray. Requests in, Results out.

    config.py        EngineConfig, Compression: what to load and how (frozen; built once from the job's config)
    request.py       Request, SamplingParams, Result: the contract with whoever hosts the engine
    loading.py       make_engine(config): the backend a config names
    model.py         LoadedModel: tokenizer, prompt embedding (the model's own multimodal forward, stopped at its
                     language model: embeddings, rotary positions, spans, DeepStack), decoder, the ids (EOS,
                     image token), device and dtype resolved once; compression applied at load
    support.py       which models run, on which decoder (lean, fallback), and why; the refused ones
    backbone.py      what the lean decoder needs to know of a text backbone (norms, RoPE, windows, caps...)
    decoder.py       the lean decoder (Llama / Mistral / Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3 / Qwen3-VL /
                     Gemma / Gemma 2 / Gemma 3) over a KVCache (kv_cache.py)
    hf_decoder.py    the generic fallback decoder (any decoder-only architecture, re-runs the HF forward)
    parity.py        the check at load: the decoder against the model's own generate, or a refusal
    processor.py     the model's processor (loaded without torchvision too) and a one-image prompt's inputs
    engine.py        SpecEngine: the continuous-batching loop (admit, round, retire)
    speculative.py   one speculative round for a group of sequences: draft, verify, accept, commit
    sequence.py      Sequence, SequenceGroup
    drafter.py       the drafter interface and make_drafter; model_drafter.py, ngram_drafter.py
    draft_length.py  how many tokens to draft (estimates.py: acceptance and cost estimates)
    sampling.py      temperature / top-k / top-p
    visual_tokens.py prunes image tokens (compression.visual_tokens)
    hf_backend.py    the reference backend: model.generate
"""
