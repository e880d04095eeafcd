"""Shared tiny builders: every test model is made from a config here, nothing is downloaded."""

import pytest
import torch
from transformers import BertConfig, BertTokenizer

WORDS = "the a cat dog sat ran on mat good bad great awful movie film was is very not and it".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]

TINY = dict(
    vocab_size=len(VOCAB),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_kwargs(**overrides) -> dict:
    return {**TINY, **overrides}


def tiny_bert_config(**overrides) -> BertConfig:
    return BertConfig(**tiny_kwargs(**overrides))


def tiny_tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def random_batch(batch: int = 3, length: int = 20, seed: int = 0, vocab: int = len(VOCAB)):
    """Random ids with ragged padding: row 0 full, the others padded at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - 3 * row - 2 :] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
