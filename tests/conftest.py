"""Shared tiny builders: every test model is made from a config here, nothing is downloaded."""

import os

import pytest
import torch
from transformers import BertConfig, BertTokenizer

if not torch.cuda.is_available():
    # The fused Triton kernels run on CPU only under Triton's interpreter, which `@triton.jit` reads when a function
    # is decorated, triton.language's own helpers included. FlexAttention imports triton.language as soon as
    # hf_sparse.attention is imported, so the switch is set here, before any test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def premasked_mlm_dataset(n: int = 64, length: int = 16, seed: int = 0):
    """Masked-LM examples with the masks drawn once here, so the only randomness in training is the model's."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (n, length), generator=g)
    chosen = torch.rand(n, length, generator=g) < 0.3
    labels = torch.where(chosen, ids, -100)
    return Dataset.from_dict({"input_ids": torch.where(chosen, 4, ids).tolist(), "labels": labels.tolist()})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
