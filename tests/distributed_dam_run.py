"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

Each process trains the same tiny DAM search with Trainer + DAMCallback, then saves what it ended with.
"""

import sys

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_sparse import SparseBertConfig, SparseBertForMaskedLM
from hf_sparse.callbacks import DAMCallback

out = sys.argv[1]
torch.manual_seed(0)
config = SparseBertConfig(
    vocab_size=30,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=32,
    dam={"structure": "offset", "penalty": 0.5, "init_noise": 0.5},
)
model = SparseBertForMaskedLM(config)
initial = model.bert.dam.logits.detach().clone()
g = torch.Generator().manual_seed(0)
ids = torch.randint(5, 30, (64, 16), generator=g)
labels = torch.where(torch.rand(64, 16, generator=g) < 0.3, ids, -100)
data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
callback = DAMCallback(gate_learning_rate=0.05, density_length=16)
args = TrainingArguments(
    output_dir=out,
    max_steps=6,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    logging_steps=2,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=0,
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=data,
    callbacks=[callback],
    optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs(model, args),
)
trainer.train()
rank = args.process_index
torch.save(
    {
        "world_size": args.world_size,
        "backend": str(trainer.accelerator.state.backend),
        "initial": initial,
        "logits": model.bert.dam.logits.detach().clone(),
        "frozen": model.bert.dam.frozen(16).clone(),
        "pattern": model.config.attention_pattern,
        "steps": trainer.state.global_step,
    },
    f"{out}/rank{rank}.pt",
)
