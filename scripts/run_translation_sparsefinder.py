"""Sparsefinder on machine translation at small scale: train an entmax Marian English→German on real offline
text, fit Sparsefinder predictors on its decoder self-attention, sweep every predictor for sparsity vs recall,
and translate with full entmax and with predicted-sparse attention at a chosen operating point.

Data: the gettext catalogues of this machine (``/usr/share/locale``, read at run time): English UI messages and
their German translations, 3..20 words on both sides; ``--dev`` and ``--test`` pairs held out. Tokenizer: one
joint, cased SentencePiece-style BPE (`tokenizers`, trained here; the BERT WordPiece of ``hf_sparse.data``
lowercases and detokenizes with spaces around punctuation, which would distort BLEU). Model: a small Marian from
scratch (3+3 layers, d_model 128, 4 heads), entmax-1.5 decoder self-attention, softmax encoder and cross
attention, trained with ``Seq2SeqTrainer``. The Sparsefinder settings (distance predictor, 4-dim projections,
window 3) are in the config from the start; MT training never touches the predictors (sparse execution is for
inference only and stays off). Predictors are fitted on ``--fit-sentences`` training pairs (teacher-forced
attention of the trained model); the sweep over every method and the operating point (the sparsest distance
threshold with recall >= ``--target-recall``) are measured on the dev pairs; BLEU/chrF (full entmax vs predicted
sparse) and the predictors' sparsity/recall at the operating point on the test pairs. Writes a markdown report
(default benchmarks/sparsefinder_mt.md), the Pareto plot and CSV beside it, and the fitted checkpoint with its
tokenizer (``AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)``).

    python scripts/run_translation_sparsefinder.py                 # the report, ~15 minutes on 2 CPU cores
    python scripts/run_translation_sparsefinder.py --steps 20      # a smoke run
    python scripts/run_translation_sparsefinder.py --model DIR     # fine-tune a local Marian checkpoint instead
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import transformers
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_sparse import EntmaxSparsefinderMarianMTModel
from hf_sparse.evaluation import pareto, sparsity_recall
from hf_sparse.sparsefinder_fit import fit
from hf_sparse.translation import (
    bleu_chrf,
    encode_pairs,
    gettext_parallel_corpus,
    small_marian_config,
    teacher_forced_batches,
    train_bpe_tokenizer,
    translate,
)

TOKENIZER_NOTE = (
    "one joint, cased SentencePiece-style BPE (`tokenizers`; chosen over the lowercasing BERT WordPiece so that "
    "BLEU/chrF compare real cased text, detokenized losslessly)"
)
# Every predictor of hf_sparse.sparsefinder, each swept over the setting that trades sparsity for recall; the
# other settings are the model's (window 3 is added to every method, except where the window itself is swept).
SWEEP = {
    "distance": [{"threshold": t} for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)],
    "quantization": [{"num_buckets": b} for b in (2, 3, 4, 6, 8)],
    "clustering": [{"num_clusters": c} for c in (2, 4, 8, 16)],
    "window": [{"window": w} for w in (0, 1, 2, 3, 4, 6, 8, 12)],
    "lsh": [{"num_buckets": b} for b in (2, 4, 8)],
    "routing": [{"num_clusters": c} for c in (2, 4, 8)],
    "bigbird": [{"window": w, "random_keys": r} for w in (1, 3) for r in (1, 2, 4)],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Marian checkpoint directory (with its tokenizer) to fine-tune")
    parser.add_argument("--lang", default="de", help="target language of the gettext catalogues")
    parser.add_argument("--steps", type=int, default=2000, help="MT training steps (0: no training)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary (new model only)")
    parser.add_argument("--d-model", type=int, default=128, help="new model only (FFN 4 * d_model)")
    parser.add_argument("--dev", type=int, default=500, help="held-out pairs for the sweep and the operating point")
    parser.add_argument("--test", type=int, default=500, help="held-out pairs for BLEU/chrF and test recall")
    parser.add_argument("--fit-sentences", type=int, default=500, help="training pairs the predictors are fit on")
    parser.add_argument("--fit-epochs", type=int, default=5)
    parser.add_argument("--window", type=int, default=3, help="Sparsefinder local window")
    parser.add_argument("--projection-dim", type=int, default=4, help="Sparsefinder r")
    parser.add_argument("--target-recall", type=float, default=0.95, help="operating point: dev recall >= this")
    parser.add_argument("--num-beams", type=int, default=1, help="1: greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/sparsefinder_mt.md")
    parser.add_argument("--png", default="benchmarks/sparsefinder_mt_pareto.png")
    parser.add_argument("--csv", default="benchmarks/sparsefinder_mt_pareto.csv")
    parser.add_argument("--out-dir", default="outputs/translation_sparsefinder")
    return parser


def build_model(args, corpus, sparsefinder):
    """A new small model with a new tokenizer, or ``--model`` (its own tokenizer) with our attention and predictors."""
    torch.manual_seed(args.seed)
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = EntmaxSparsefinderMarianMTModel.from_pretrained(
            args.model, decoder_attention_fn="entmax15", sparsefinder=sparsefinder
        )
        return model, tokenizer
    tokenizer = train_bpe_tokenizer([text for pair in corpus.train for text in pair], args.vocab_size)
    config = small_marian_config(tokenizer, args.d_model, sparsefinder)
    return EntmaxSparsefinderMarianMTModel(config), tokenizer


def train(model, tokenizer, corpus, args) -> list[dict]:
    """Seq2SeqTrainer with label smoothing, length-grouped batches; returns the logged losses."""
    training_args = Seq2SeqTrainingArguments(
        output_dir=os.path.join(args.out_dir, "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        adam_beta2=0.98,
        warmup_steps=max(args.steps // 10, 1),
        label_smoothing_factor=0.1,
        train_sampling_strategy="group_by_length",
        logging_steps=max(args.steps // 10, 1),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=encode_pairs(tokenizer, corpus.train),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def operating_threshold(rows: list[dict], target: float) -> tuple[float, dict]:
    """The sparsest distance threshold with dev recall >= ``target`` (else the most recalling one).

    ``pareto`` returns one row per sweep point, in the order of ``SWEEP``; its ``setting`` is text.
    """
    points = [(method, overrides) for method, settings in SWEEP.items() for overrides in settings]
    distance = [(row, overrides) for row, (method, overrides) in zip(rows, points) if method == "distance"]
    good = [pair for pair in distance if pair[0]["recall"] >= target]
    row, overrides = (
        max(good, key=lambda p: p[0]["graph_sparsity"]) if good else max(distance, key=lambda p: p[0]["recall"])
    )
    return float(overrides["threshold"]), row


def setting_text(setting) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) if isinstance(setting, dict) else str(setting)


def main():
    parser = build_parser()
    args = parser.parse_args()
    started = time.time()
    seconds = {}
    corpus = gettext_parallel_corpus(args.lang, dev_size=args.dev, test_size=args.test, seed=args.seed)
    print(f"{len(corpus.train)} training / {len(corpus.dev)} dev / {len(corpus.test)} test pairs")
    sparsefinder = {"method": "distance", "projection_dim": args.projection_dim, "window": args.window}
    model, tokenizer = build_model(args, corpus, sparsefinder)

    t0 = time.time()
    losses = train(model, tokenizer, corpus, args) if args.steps > 0 else []
    seconds["MT training"] = time.time() - t0
    model.eval()

    # Predictors: fitted on training pairs; the sweep and the operating point on dev; recall checked on test.
    t0 = time.time()
    fit_batches = teacher_forced_batches(model, tokenizer, corpus.train[: args.fit_sentences])
    fit_losses = fit(model, fit_batches, epochs=args.fit_epochs, max_sentences=args.fit_sentences, seed=args.seed)
    seconds["predictor fitting"] = time.time() - t0
    t0 = time.time()
    rows = pareto(model, teacher_forced_batches(model, tokenizer, corpus.dev), SWEEP, args.csv, args.png)
    threshold, chosen = operating_threshold(rows, args.target_recall)
    model.config.sparsefinder["threshold"] = threshold
    test_graph = sparsity_recall(model, teacher_forced_batches(model, tokenizer, corpus.test))
    seconds["sweep and test recall"] = time.time() - t0

    # Translation quality: full entmax vs decoder self-attention restricted to the predicted pairs.
    sources, references = [s for s, _ in corpus.test], [t for _, t in corpus.test]
    quality, outputs = {}, {}
    for name, enabled in (("full entmax", False), (f"predicted sparse (threshold {threshold:g})", True)):
        model.config.sparsefinder["enabled"] = enabled
        t0 = time.time()
        outputs[name] = translate(model, tokenizer, sources, num_beams=args.num_beams, desc=name)
        seconds[f"decoding, {name}"] = time.time() - t0
        quality[name] = bleu_chrf(outputs[name], references)
        print(f"{name}: BLEU {quality[name]['bleu']:.2f}, chrF {quality[name]['chrf']:.2f}")
    model.config.sparsefinder["enabled"] = False  # the checkpoint decodes with full entmax unless asked

    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    seconds["total"] = time.time() - started

    results = dict(losses=losses, fit_losses=fit_losses, rows=rows, threshold=threshold, chosen=chosen)
    results.update(test_graph=test_graph, quality=quality, outputs=outputs, seconds=seconds)
    write_report(args, vars(parser.parse_args([])), corpus, model, tokenizer, results)
    print(f"report written to {args.out}; checkpoint in {args.out_dir}; total {seconds['total'] / 60:.1f} min")


def write_report(args, defaults, corpus, model, tokenizer, results):
    """The markdown report: setup, BLEU/chrF full vs sparse, test recall per head, the dev sweep, samples."""
    rows, threshold, chosen = results["rows"], results["threshold"], results["chosen"]
    quality, outputs, seconds = results["quality"], results["outputs"], results["seconds"]
    test_graph = results["test_graph"]
    cfg = model.config
    command = "python scripts/run_translation_sparsefinder.py" + "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in vars(args).items() if value != defaults[key]
    )
    n_params = sum(p.numel() for n, p in model.named_parameters() if "sparsefinder" not in n)
    loss_curve = ", ".join(f"{entry['step']}: {entry['loss']:.2f}" for entry in results["losses"]) or "no training"
    fit_curve = "; ".join(f"layer {i}: {v[0]:.3f} → {v[-1]:.3f}" for i, v in results["fit_losses"].items() if v)
    test = test_graph["average"]
    lines = [
        "# Sparsefinder on machine translation (English→German, small scale, CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"- Data: English→{args.lang} UI messages of the gettext catalogues on this machine (read at run time), "
        f"pairs with 3..20 words on both sides, shuffled (seed {args.seed}): {len(corpus.train)} training, "
        f"{len(corpus.dev)} dev, {len(corpus.test)} test pairs.",
        f"- Tokenizer: {TOKENIZER_NOTE if not args.model else 'the checkpoint' + chr(39) + 's own'}"
        f" of {len(tokenizer)} tokens (`{tokenizer.pad_token}` = padding and decoder start, `{tokenizer.eos_token}` "
        "= end of sequence).",
        f"- Model: {f'`{args.model}` fine-tuned' if args.model else 'Marian trained from scratch'}: "
        f"{cfg.encoder_layers}+{cfg.decoder_layers} layers, d_model {cfg.d_model}, {cfg.decoder_attention_heads} "
        f"heads, FFN {cfg.decoder_ffn_dim}, {cfg.max_position_embeddings} positions, tied embeddings, "
        f"{n_params / 1e6:.1f} M parameters; decoder self-attention {cfg.decoder_attention_fn}, encoder "
        f"{cfg.encoder_attention_fn}, cross {cfg.cross_attention_fn}.",
        f"- MT training: Seq2SeqTrainer, {args.steps} steps of batch {args.batch_size} (length-grouped), AdamW lr "
        f"{args.lr}, 10 % warm-up then linear decay, label smoothing 0.1, dropout {cfg.dropout}; "
        f"{seconds['MT training'] / 60:.1f} min. Training loss by step: {loss_curve}.",
        f"- Sparsefinder: distance predictor, r = {args.projection_dim}, window {args.window}; projections fitted on "
        f"the teacher-forced decoder self-attention of {args.fit_sentences} training pairs, {args.fit_epochs} "
        f"epochs (margin loss, first → last step: {fit_curve}).",
        f"- Sweep on the dev pairs, every method's pairs united with the window {args.window} unless the window "
        f"itself is swept. Operating point: the sparsest distance threshold with dev recall ≥ {args.target_recall}: "
        f"**threshold {threshold:g}** (dev graph sparsity {100 * chosen['graph_sparsity']:.1f} %, recall "
        f"{100 * chosen['recall']:.1f} %).",
        f"- Decoding: {'greedy' if args.num_beams == 1 else f'beam {args.num_beams}'}, at most 64 tokens; BLEU and "
        "chrF by sacreBLEU (default settings, cased) on the test pairs.",
        f"- Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, transformers {transformers.__version__}. Time: "
        + ", ".join(f"{name} {value / 60:.1f} min" for name, value in seconds.items())
        + ".",
        "",
        "## Translation quality on the test pairs",
        "",
        "| decoder self-attention | BLEU | chrF |",
        "|---|---:|---:|",
        *(f"| {name} | {q['bleu']:.2f} | {q['chrf']:.2f} |" for name, q in quality.items()),
        "",
        f"Predicted graphs at threshold {threshold:g} on the test pairs (teacher-forced): gold sparsity "
        f"{100 * test['gold_sparsity']:.1f} %, graph sparsity {100 * test['graph_sparsity']:.1f} %, recall "
        f"{100 * test['recall']:.1f} %, exact {100 * test['exact']:.1f} %.",
        "",
        "| decoder layer | gold sparsity % per head | graph sparsity % per head | recall % per head |",
        "|---|---|---|---|",
        *(
            f"| {layer} | "
            + " | ".join(percentages(m[k]) for k in ("gold_sparsity", "graph_sparsity", "recall"))
            + " |"
            for layer, m in test_graph["per_layer"].items()
        ),
        "",
        "## Sparsity vs recall of every predictor on the dev pairs "
        f"(gold sparsity {100 * rows[0]['gold_sparsity']:.1f} %)",
        "",
        f"![Pareto plot]({os.path.relpath(args.png, os.path.dirname(args.out) or '.')}) (`{args.png}`; rows also in "
        f"`{args.csv}`)",
        "",
        "| method | setting | graph sparsity % | recall % | exact % |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r['method']} | {setting_text(r['setting'])} | {100 * r['graph_sparsity']:.1f} | "
            f"{100 * r['recall']:.1f} | {100 * r['exact']:.1f} |"
            for r in rows
        ),
        "",
        "## Sample test translations",
        "",
        "| source | reference | " + " | ".join(outputs) + " |",
        "|---" * (2 + len(outputs)) + "|",
        *(
            "| " + " | ".join(cell(text) for text in (src, ref, *(o[i] for o in outputs.values()))) + " |"
            for i, (src, ref) in enumerate(corpus.test[:5])
        ),
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def percentages(values) -> str:
    return " ".join(f"{100 * float(v):.1f}" for v in values)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    main()
