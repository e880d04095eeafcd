"""Sparsefinder for an encoder: an entmax SparseBERT for masked language modelling whose attention sparsity is
predicted, every method side by side, then used for predicted-sparse attention.

1. A BERT: ``--model PATH`` (any local BERT / SparseBERT MLM checkpoint with its tokenizer), or, by default, a
   small one pre-trained here with softmax attention on the offline corpus (English gettext messages).
2. Fine-tuned to α-entmax attention (α = 1.5) with the MLM objective (Trainer).
3. Sparsefinder predictors fitted on the model's own attention (``hf_sparse.sparsefinder_fit.fit``).
4. Sparsity/recall of every method over a sweep (CSV + Pareto PNG), and of the learned method combined with a
   fixed local pattern (pattern ∩ predicted, pattern ∪ predicted).
5. Held-out MLM accuracy and perplexity with full entmax and with predicted-sparse attention at each method's
   operating point (the sparsest sweep point with recall ≥ ``--recall``).

    python scripts/run_mlm_sparsefinder.py    # ~15 minutes on 2 CPU cores; writes benchmarks/sparsefinder_mlm.md
    python scripts/run_mlm_sparsefinder.py --pretrain-steps 20 --entmax-steps 20 --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import transformers

from hf_sparse import SparseBertForMaskedLM
from hf_sparse.evaluation import DEFAULT_SWEEP, masked_lm_metrics, operating_point, pareto, predictor_like
from hf_sparse.mlm import (
    corpus_for_tokenizer,
    fixed_mask_batches,
    offline_mlm_corpus,
    small_bert_config,
    train_mlm,
)
from hf_sparse.sparsefinder import resolve_config
from hf_sparse.sparsefinder_fit import collect_attention, fit

QUICK_SWEEP = {method: points[:2] for method, points in DEFAULT_SWEEP.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local BERT MLM checkpoint directory (with tokenizer); default: pre-train one")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--entmax-steps", type=int, default=300)
    parser.add_argument("--fit-sentences", type=int, default=128, help="blocks whose attention the predictors see")
    parser.add_argument("--recall", type=float, default=0.9, help="operating point: sparsest setting with this recall")
    parser.add_argument("--pattern", default="window:16", help="fixed pattern combined with the prediction")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="two sweep points per method")
    parser.add_argument("--out", default="benchmarks/sparsefinder_mlm.md")
    parser.add_argument("--out-dir", default="outputs/mlm_sparsefinder")
    args = parser.parse_args()
    started = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    sparsefinder = {"method": "distance", "projection_dim": 4, "window": 1, "threshold": 1.0}

    # 1-2. a BERT, then entmax attention with the MLM objective
    if args.model:
        from transformers import AutoTokenizer

        # the text is tokenized with the checkpoint's tokenizer
        corpus = corpus_for_tokenizer(AutoTokenizer.from_pretrained(args.model), block_size=args.block, seed=args.seed)
        softmax_model = SparseBertForMaskedLM.from_pretrained(args.model)
        origin = f"checkpoint {args.model}"
    else:
        corpus = offline_mlm_corpus(block_size=args.block, seed=args.seed)
        torch.manual_seed(args.seed)
        softmax_model = SparseBertForMaskedLM(small_bert_config(corpus.tokenizer, args.block))
        train_mlm(softmax_model, corpus, args.out_dir, steps=args.pretrain_steps, seed=args.seed)
        softmax_model.save_pretrained(os.path.join(args.out_dir, "softmax"))
        origin = f"small BERT pre-trained here with softmax attention for {args.pretrain_steps} steps"
    softmax_metrics = masked_lm_metrics(softmax_model, corpus.tokenizer, corpus.eval, seed=args.seed)
    source = args.model or os.path.join(args.out_dir, "softmax")
    model = SparseBertForMaskedLM.from_pretrained(source, attention_fn="entmax15", sparsefinder=sparsefinder)
    converted = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    train_mlm(model, corpus, args.out_dir, steps=args.entmax_steps, learning_rate=5e-4, seed=args.seed)
    full = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    print(f"entmax fine-tuned: accuracy {full['accuracy']:.3f} (softmax model {softmax_metrics['accuracy']:.3f})")

    # 3. predictors from the model's own attention
    fit_blocks = corpus.train.select(range(min(args.fit_sentences, len(corpus.train))))
    fit_data = fixed_mask_batches(fit_blocks, corpus.tokenizer, seed=args.seed)
    eval_data = fixed_mask_batches(corpus.eval, corpus.tokenizer, seed=args.seed + 1)
    fit(model, fit_data, epochs=5, max_sentences=args.fit_sentences)

    # 4. sparsity / recall of every method; the learned method combined with a fixed pattern
    sweep = QUICK_SWEEP if args.quick else DEFAULT_SWEEP
    png = os.path.splitext(args.out)[0] + "_pareto.png"
    rows = pareto(model, eval_data, sweep, csv_path=os.path.join(args.out_dir, "pareto.csv"), png_path=png)
    combos = []
    for combine, sign in (("intersection", "∩"), ("union", "∪")):
        model.config.sparsefinder["combine"] = combine
        combos += [
            {**r, "method": f"{args.pattern} {sign} distance"}
            for r in pareto(model, eval_data, {"distance": sweep["distance"]}, progress=False, pattern=args.pattern)
        ]
    # the pattern alone, for reference: (the diagonal, window 0) ∪ pattern = pattern
    combos += [
        {**r, "method": f"{args.pattern} alone"}
        for r in pareto(model, eval_data, {"window": [{"window": 0}]}, progress=False, pattern=args.pattern)
    ]
    model.config.sparsefinder["combine"] = "intersection"

    # 5. MLM quality with predicted-sparse attention at each method's operating point
    collected = collect_attention(model, fit_data, max_sentences=args.fit_sentences, progress=False)
    fitted = {layer: module.sparsefinder for layer, module in model.sparsefinder_modules().items()}
    base = dict(model.config.sparsefinder)
    measured = []
    for method in sweep:
        point = operating_point(rows, method, args.recall)
        settings = resolve_config({**base, "method": method, **point["overrides"]})
        for layer, module in model.sparsefinder_modules().items():
            module.sparsefinder = predictor_like(fitted[layer], settings, collected[layer])
        model.config.sparsefinder = {**settings, "enabled": True}
        measured.append((method, point, masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)))
        print(f"{method} ({point['setting']}): accuracy {measured[-1][2]['accuracy']:.3f}")
    for layer, module in model.sparsefinder_modules().items():
        module.sparsefinder = fitted[layer]
    model.config.sparsefinder = base

    lines = [
        "# Sparsefinder on an entmax SparseBERT (masked LM)",
        "",
        "Command: `python scripts/run_mlm_sparsefinder.py"
        + (f" --model {args.model}" if args.model else "")
        + f" --pretrain-steps {args.pretrain_steps} --entmax-steps {args.entmax_steps} "
        f"--fit-sentences {args.fit_sentences} --recall {args.recall} --pattern {args.pattern} --seed {args.seed}"
        + (" --quick" if args.quick else "")
        + "`",
        "",
        f"- Model: {origin}; converted to α-entmax (α = 1.5) attention and fine-tuned with MLM for "
        f"{args.entmax_steps} steps (lr 5e-4). Data: English gettext messages in blocks of {args.block}, "
        f"{len(corpus.train)} training / {len(corpus.eval)} held-out blocks.",
        f"- Predictors: distance, projections to 4 dimensions, window 1, fitted for 5 epochs on the attention of "
        f"{args.fit_sentences} training blocks; metrics over the held-out blocks (padding excluded).",
        f"- Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; total {(time.time() - started) / 60:.1f} min.",
        "",
        "## Masked-LM quality",
        "",
        "| model | attention | graph sparsity | recall | held-out accuracy | perplexity |",
        "|---|---|---:|---:|---:|---:|",
        f"| softmax BERT | dense | 0 | 1 | {softmax_metrics['accuracy']:.3f} | {softmax_metrics['perplexity']:.1f} |",
        f"| same weights, entmax, no fine-tuning | full entmax | – | – | {converted['accuracy']:.3f} | "
        f"{converted['perplexity']:.1f} |",
        f"| entmax fine-tuned | full entmax | 0 | 1 | {full['accuracy']:.3f} | {full['perplexity']:.1f} |",
    ]
    for method, point, sparse in measured:
        lines.append(
            f"| entmax fine-tuned | predicted-sparse: {method} ({point['setting']}) | {point['graph_sparsity']:.3f} | "
            f"{point['recall']:.3f} | {sparse['accuracy']:.3f} | {sparse['perplexity']:.1f} |"
        )
    lines += [
        "",
        f"Gold sparsity (pairs α-entmax drops): {rows[0]['gold_sparsity']:.3f}.",
        "",
        "## Sparsity vs recall, every method",
        "",
        f"![Pareto]({os.path.basename(png)})",
        "",
        "| method | setting | graph sparsity | recall | exact |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['setting']} | {r['graph_sparsity']:.3f} | {r['recall']:.3f} | {r['exact']:.3f} |"
        for r in rows + combos
    ]
    lines += ["", "Operating points (sparsest setting with recall ≥ " + f"{args.recall}):", ""]
    lines += [
        f"- {m}: {operating_point(rows, m, args.recall)['setting']} → sparsity "
        f"{operating_point(rows, m, args.recall)['graph_sparsity']:.3f}, "
        f"recall {operating_point(rows, m, args.recall)['recall']:.3f}"
        for m in sweep
    ]
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    model.save_pretrained(os.path.join(args.out_dir, "entmax_sparsefinder"))
    corpus.tokenizer.save_pretrained(os.path.join(args.out_dir, "entmax_sparsefinder"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
