"""Run by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo).

Each process trains the same tiny entmax SparseBERT with Trainer + SparsefinderCallback, handing the callback a fit
dataloader that differs per rank (so only the broadcast from process 0 can make the predictors agree), then saves
its predictor state and the pairs every layer predicts on a fixed probe.
"""

import sys

import torch
from transformers import Trainer, TrainingArguments

from conftest import premasked_mlm_dataset, random_batch, tiny_kwargs  # this script's folder is on sys.path
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM
from hf_sparse.callbacks import SparsefinderCallback
from hf_sparse.sparsefinder import predict_pairs

out = sys.argv[1]
torch.manual_seed(0)
sparsefinder = {"method": "distance", "projection_dim": 2, "window": 1, "threshold": 1.0}
config = SparseBertConfig(**tiny_kwargs(attention_fn="entmax15", sparsefinder=sparsefinder))
model = SparseBertForMaskedLM(config)
with torch.no_grad():  # sharper scores so entmax is clearly sparse, as in test_sparsefinder_bert.py
    for layer in model.bert.encoder.layer:
        layer.attention.self.query.weight.mul_(8.0)


def predictor_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".sparsefinder." in k}


initial = predictor_state()
args = TrainingArguments(
    output_dir=out,
    max_steps=4,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    logging_steps=2,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
rank = args.process_index
fit_batches = [  # different on every rank
    dict(zip(("input_ids", "attention_mask"), random_batch(seed=100 * rank + s))) for s in range(2)
]
callback = SparsefinderCallback(fit_batches, epochs=2, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=premasked_mlm_dataset(), callbacks=[callback])
trainer.train()

g = torch.Generator().manual_seed(7)
head_dim = config.hidden_size // config.num_attention_heads
probe = [torch.randn(2, config.num_attention_heads, 12, head_dim, generator=g) for _ in range(2)]
with torch.no_grad():
    pairs = {
        layer: predict_pairs(attn.sparsefinder, *probe, model.config.sparsefinder, None, causal=False)
        for layer, attn in model.sparsefinder_modules().items()
    }
torch.save(
    {
        "world_size": args.world_size,
        "backend": str(trainer.accelerator.state.backend),
        "steps": trainer.state.global_step,
        "initial": initial,
        "state": predictor_state(),
        "fitted": all(bool(m.sparsefinder.fitted) for m in model.sparsefinder_modules().values()),
        "fit_inputs": torch.stack([b["input_ids"] for b in fit_batches]),
        "losses": callback.losses,
        "pairs": pairs,
    },
    f"{out}/rank{rank}.pt",
)
