"""Run by test_faults.py in a subprocess: a DAM search (then freeze) or an entmax SparseBERT run ending in a
Sparsefinder fit, with Trainer checkpoints every 2 steps. ``--kill-at-step N`` SIGKILLs the process right after
checkpoint N is written; ``--kill-in-fit`` SIGKILLs it after the fit's first optimisation step; ``--resume DIR``
resumes from that checkpoint. The final model state is saved to ``OUT/final.pt``.

    python fault_run.py dam|sparsefinder OUT [--kill-at-step N] [--kill-in-fit] [--resume DIR]
"""

import argparse
import os
import signal

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import premasked_mlm_dataset, random_batch, tiny_kwargs  # this script's folder is on sys.path
from hf_sparse import DAMCallback, SparseBertConfig, SparseBertForMaskedLM, SparsefinderCallback, sparsefinder_fit

parser = argparse.ArgumentParser()
parser.add_argument("kind", choices=["dam", "sparsefinder"])
parser.add_argument("out")
parser.add_argument("--kill-at-step", type=int)
parser.add_argument("--kill-in-fit", action="store_true")
parser.add_argument("--resume")
args = parser.parse_args()


class KillAfterSave(TrainerCallback):
    def on_save(self, _args, state, control, **kwargs):
        if state.global_step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


if args.kill_in_fit:  # the fit's first step done, then the process dies in the middle of fitting
    original = sparsefinder_fit.fit_projections

    def dying(*a, **kw):
        kw["on_step"] = lambda step, loss: os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **kw)

    sparsefinder_fit.fit_projections = dying

torch.manual_seed(0)
if args.kind == "dam":
    config = SparseBertConfig(**tiny_kwargs(dam={"structure": "offset", "penalty": 0.3, "init_noise": 0.5}))
    callbacks = [DAMCallback(gate_learning_rate=0.05, final_temperature=0.3, temperature_schedule="cosine")]
else:
    config = SparseBertConfig(
        **tiny_kwargs(attention_fn="entmax15", sparsefinder={"method": "distance", "window": 1, "threshold": 0.8})
    )
    loader = [dict(zip(("input_ids", "attention_mask"), random_batch(seed=s))) for s in range(2)]
    callbacks = [SparsefinderCallback(loader, epochs=3, seed=0)]
model = SparseBertForMaskedLM(config)
training = TrainingArguments(
    output_dir=args.out,
    max_steps=8,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    save_strategy="steps",
    save_steps=2,
    logging_steps=2,
    report_to=[],
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
)
optimizer = callbacks[0].optimizer_cls_and_kwargs(model, training) if args.kind == "dam" else None
trainer = Trainer(
    model=model,
    args=training,
    train_dataset=premasked_mlm_dataset(),
    callbacks=[*callbacks, KillAfterSave()],
    **({"optimizer_cls_and_kwargs": optimizer} if optimizer else {}),
)
trainer.train(resume_from_checkpoint=args.resume)
torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(args.out, "final.pt"))
