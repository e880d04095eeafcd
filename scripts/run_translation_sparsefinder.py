"""Sparsefinder on machine translation at small scale: train an entmax Marian English→German on real offline
text, fit Sparsefinder predictors on its decoder self-attention, sweep every predictor for sparsity vs recall,
and translate with full entmax and with predicted-sparse attention at a chosen operating point.

Data: the gettext catalogues of this machine (``/usr/share/locale``, read at run time): English UI messages and
their German translations, 3..20 words on both sides; ``--dev`` and ``--test`` pairs held out. Tokenizer: one joint,
cased SentencePiece-style BPE (`tokenizers`, trained here; the BERT WordPiece of ``hf_sparse.data`` lowercases and
detokenizes with spaces around punctuation, which would distort BLEU). Model: a small Marian from scratch (3+3
layers, d_model 128, 4 heads), entmax-1.5 decoder self-attention, softmax encoder and cross attention, trained with
``Seq2SeqTrainer``. The Sparsefinder settings (``--method``, default distance; 4-dim projections, window 3) are in
the config from the start; MT training never touches the predictors (sparse execution is for inference only and
stays off). Predictors are fitted on ``--fit-sentences`` training pairs (teacher-forced attention of the trained
model); the sweep over every method and the operating point (the sparsest ``--method`` setting with recall >=
``--target-recall``) are measured on the dev pairs; BLEU/chrF (full entmax vs predicted sparse) and the predictors'
sparsity/recall at the operating point on the test pairs. Writes a markdown report (default
benchmarks/sparsefinder_mt.md), the Pareto plot and CSV beside it, and, under ``--out-dir``/model, the fitted
checkpoint (predicted-sparse decoding on) with its tokenizer, metrics.json, pareto.png and model card
(``AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)``).

    python scripts/run_translation_sparsefinder.py                 # the report, ~15 minutes on 2 CPU cores
    python scripts/run_translation_sparsefinder.py --steps 20      # a smoke run
    python scripts/run_translation_sparsefinder.py --model DIR     # fine-tune a local Marian checkpoint instead

The run itself is :func:`hf_sparse.translation_sparsefinder.run_translation_sparsefinder` (also behind
``hf-sparse sparsefinder --task translation``); this script adds the report.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil

import torch
import transformers

from hf_sparse.translation_sparsefinder import FITTED_METHODS, run_translation_sparsefinder
from hf_sparse_cli import show_progress

TOKENIZER_NOTE = (
    "one joint, cased SentencePiece-style BPE (`tokenizers`; chosen over the lowercasing BERT WordPiece so that "
    "BLEU/chrF compare real cased text, detokenized losslessly)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Marian checkpoint directory (with its tokenizer) to fine-tune")
    parser.add_argument("--lang", default="de", help="target language of the gettext catalogues")
    parser.add_argument("--steps", type=int, default=2000, help="MT training steps (0: no training)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 new model, 5e-5 fine-tuning --model")
    parser.add_argument("--vocab-size", type=int, default=None, help="joint BPE vocabulary (new model only; 8000)")
    parser.add_argument("--d-model", type=int, default=None, help="new model only (128; FFN 4 * d_model)")
    parser.add_argument("--dev", type=int, default=500, help="held-out pairs for the sweep and the operating point")
    parser.add_argument("--test", type=int, default=500, help="held-out pairs for BLEU/chrF and test recall")
    parser.add_argument("--fit-sentences", type=int, default=500, help="training pairs the predictors are fit on")
    parser.add_argument("--fit-epochs", type=int, default=5)
    parser.add_argument("--method", default="distance", choices=FITTED_METHODS, help="predictor fitted and saved")
    parser.add_argument("--window", type=int, default=3, help="Sparsefinder local window")
    parser.add_argument("--projection-dim", type=int, default=4, help="Sparsefinder r")
    parser.add_argument("--target-recall", type=float, default=0.95, help="operating point: dev recall >= this")
    parser.add_argument("--num-beams", type=int, default=1, help="1: greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/sparsefinder_mt.md")
    parser.add_argument("--png", default="benchmarks/sparsefinder_mt_pareto.png")
    parser.add_argument("--csv", default="benchmarks/sparsefinder_mt_pareto.csv")
    parser.add_argument("--out-dir", default="outputs/translation_sparsefinder", help="checkpoint under OUT_DIR/model")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    show_progress()  # the run's progress lines (hf_sparse logs them) on stdout, as the hf-sparse command shows them
    try:
        run = run_translation_sparsefinder(
            model=args.model,
            lang=args.lang,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            vocab_size=args.vocab_size,
            d_model=args.d_model,
            method=args.method,
            projection_dim=args.projection_dim,
            window=args.window,
            target_recall=args.target_recall,
            fit_sentences=args.fit_sentences,
            fit_epochs=args.fit_epochs,
            dev_size=args.dev,
            test_size=args.test,
            num_beams=args.num_beams,
            seed=args.seed,
            output_dir=args.out_dir,
        )
    except ValueError as error:  # bad arguments: the message names the value and what is valid
        parser.error(str(error))
    for made, wanted in (("pareto.png", args.png), ("pareto.csv", args.csv)):
        os.makedirs(os.path.dirname(wanted) or ".", exist_ok=True)
        shutil.copy(os.path.join(args.out_dir, made), wanted)
    write_report(args, vars(parser.parse_args([])), run)
    print(f"report written to {args.out}; checkpoint in {run.model_dir}; total {run.seconds['total'] / 60:.1f} min")


def write_report(args, defaults, run):
    """The markdown report: setup, BLEU/chrF full vs sparse, test recall per head, the dev sweep, samples."""
    corpus, model, tokenizer, metrics = run.corpus, run.model, run.tokenizer, run.metrics
    rows, chosen, outputs, seconds, test_graph = (
        run.rows,
        run.operating_point,
        run.translations,
        run.seconds,
        run.test_graph,
    )
    setting = f"{args.method} {chosen['setting']}"
    cfg = model.config
    command = "python scripts/run_translation_sparsefinder.py" + "".join(
        f" --{key.replace('_', '-')} {value}" for key, value in vars(args).items() if value != defaults[key]
    )
    n_params = sum(p.numel() for n, p in model.named_parameters() if "sparsefinder" not in n)
    loss_curve = ", ".join(f"{entry['step']}: {entry['loss']:.2f}" for entry in run.train_losses) or "no training"
    fit_curve = "; ".join(f"layer {i}: {v[0]:.3f} → {v[-1]:.3f}" for i, v in run.fit_losses.items() if v)
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
        f"{run.settings['learning_rate']}, 10 % warm-up then linear decay, label smoothing 0.1, dropout {cfg.dropout}; "
        f"{seconds['MT training'] / 60:.1f} min. Training loss by step: {loss_curve}.",
        f"- Sparsefinder: {args.method} predictor, r = {args.projection_dim}, window {args.window}; projections "
        f"fitted on the teacher-forced decoder self-attention of {metrics['fit_pairs']} training pairs, "
        f"{args.fit_epochs} epochs (margin loss, first → last step: {fit_curve}).",
        f"- Sweep on the dev pairs, every method's pairs united with the window {args.window} unless the window "
        f"itself is swept. Operating point: the sparsest {args.method} setting with dev recall ≥ {args.target_recall}"
        f"{'' if metrics['target_recall_reached'] else ' (none reached it: the most recalling one)'}: **{setting}** "
        f"(dev graph sparsity {100 * chosen['graph_sparsity']:.1f} %, recall {100 * chosen['recall']:.1f} %).",
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
        *(
            f"| {name} | {metrics[f'test_bleu_{key}']:.2f} | {metrics[f'test_chrf_{key}']:.2f} |"
            for name, key in (("full entmax", "full_entmax"), (f"predicted sparse ({setting})", "predicted_sparse"))
        ),
        "",
        f"Predicted graphs at {setting} on the test pairs (teacher-forced): gold sparsity "
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
            f"| {r['method']} | {r['setting']} | {100 * r['graph_sparsity']:.1f} | "
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
