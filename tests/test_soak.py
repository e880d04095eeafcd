"""Soak: many forwards of mixed lengths, patterns and kernels through one model keep memory flat and the mask cache
bounded (quick enough for CI: a tiny model, 1,000 forwards; ``SOAK_FORWARDS`` changes the count). FlexAttention,
which compiles, is left to test_block_maps (its compilations are counted there)."""

import os
import random
from pathlib import Path

import torch

from conftest import tiny_kwargs
from hf_sparse import SparseBertConfig, SparseBertModel
from hf_sparse.block_maps import CACHE

PATTERNS = ["window:3", "bigbird:2,1,2", "random:3", "longformer:4,1", "dense", "strided:8&causal", "block_local:16"]


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_mixed_forwards_keep_memory_flat_and_the_cache_bounded():
    forwards = int(os.environ.get("SOAK_FORWARDS", "1000"))
    rng = random.Random(0)
    models = {
        fn: SparseBertModel(SparseBertConfig(**tiny_kwargs(attention_fn=fn, max_position_embeddings=256))).eval()
        for fn in ("softmax", "entmax15")
    }
    warm = forwards // 3
    with torch.no_grad():
        for step in range(forwards):
            fn = rng.choice(list(models))
            model = models[fn]
            model.config.attention_pattern = rng.choice(PATTERNS)
            random_keys = "random" in model.config.attention_pattern or "bigbird" in model.config.attention_pattern
            model.config.attention_backend = rng.choice(  # random keys per sequence: dense kernels (test_attention)
                ["auto", "eager"] + ([] if random_keys else ["tiles"]) + (["sdpa"] if fn == "softmax" else [])
            )
            batch, n = rng.randint(1, 4), rng.randint(1, 256)
            ids = torch.randint(0, model.config.vocab_size, (batch, n))
            mask = (torch.arange(n)[None] < torch.randint(1, n + 1, (batch, 1))).long()
            out = model(ids, attention_mask=mask).last_hidden_state
            assert torch.isfinite(out).all()
            if step == warm:
                baseline = resident_mib()
    grown = resident_mib() - baseline
    assert grown <= 0.1 * baseline, f"resident memory grew {grown:.0f} MiB over {baseline:.0f} MiB"
    assert len(CACHE) <= CACHE.max_entries and CACHE.bytes <= CACHE.max_bytes
