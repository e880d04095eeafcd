"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

Each process trains the same tiny DAM search with Trainer + DAMCallback, then saves what it ended with.
"""

import sys

import torch
from transformers import Trainer, TrainingArguments

from conftest import premasked_mlm_dataset, tiny_kwargs  # this script's folder is on sys.path
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM
from hf_sparse.callbacks import DAMCallback

out = sys.argv[1]
torch.manual_seed(0)
config = SparseBertConfig(**tiny_kwargs(dam={"structure": "offset", "penalty": 0.5, "init_noise": 0.5}))
model = SparseBertForMaskedLM(config)
initial = model.bert.dam.logits.detach().clone()
data = premasked_mlm_dataset()
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
