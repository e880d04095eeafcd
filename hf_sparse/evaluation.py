"""Measuring models: held-out masked-LM quality (more to come: sparsity/recall and Pareto sweeps)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForLanguageModeling


@torch.no_grad()
def masked_lm_metrics(
    model, tokenizer, texts: list[str] | list[dict], max_length: int = 64, batch_size: int = 64, seed: int = 0
) -> dict[str, float]:
    """Masked-token accuracy, loss and perplexity with BERT's 15% masking, reproducible from ``seed``.

    ``texts``: strings (tokenized here, truncated to ``max_length``) or already tokenized examples.
    The same seed masks the same tokens, so two models (say, dense and sparse) are compared on identical inputs.
    """
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="masked-LM eval", leave=False):
            encoded = [
                t if isinstance(t, dict) else tokenizer(t, truncation=True, max_length=max_length)
                for t in texts[start : start + batch_size]
            ]
            batch = collator(encoded)
            labels = batch.pop("labels")
            batch = {k: v.to(model.device) for k, v in batch.items()}
            labels = labels.to(model.device)
            logits = model(**batch).logits
            chosen = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum").item()
            correct += (logits[chosen].argmax(-1) == labels[chosen]).sum().item()
            total += chosen.sum().item()
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    loss = loss_sum / max(total, 1)
    return {"accuracy": correct / max(total, 1), "loss": loss, "perplexity": math.exp(loss), "masked_tokens": total}
