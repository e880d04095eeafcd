"""The ``hf-sparse`` command.

hf-sparse patterns [SPEC ...] [--n 128] [--png patterns.png]   sparsity table (+ heatmaps) of pattern specs
hf-sparse demo [--pattern bigbird:3,1,2] [--steps 300]         train, evaluate, save and reload a SparseBERT
"""

from __future__ import annotations

import argparse
import os
import sys

PAPER_PATTERNS = ["strided:4", "fixed:4,1", "longformer:2,1", "logsparse", "bigbird:2,1,2", "star", "no_diagonal"]


def cmd_patterns(args: argparse.Namespace) -> None:
    from .patterns import block_density, describe, parse, sparsity

    specs = args.specs or PAPER_PATTERNS
    print(f"{'pattern':<24} {'sparsity % (n=' + str(args.n) + ')':>20} {'128-tiles kept %':>18}")
    for spec in specs:
        pattern = parse(spec)
        tiles = 100 * block_density(pattern, args.n)
        print(f"{str(pattern):<24} {100 * sparsity(pattern, args.n):>20.2f} {tiles:>18.1f}")
    if args.png:
        from .plotting import plot_patterns

        plot_patterns(specs, args.n, args.png)
        print(f"heatmaps written to {args.png}")
    if args.list:
        print("\nvalid specs:\n" + describe())


def cmd_demo(args: argparse.Namespace) -> None:
    """Masked-LM pre-training of a small SparseBERT on real offline text, end to end through the Hub format."""
    import torch
    from transformers import AutoModelForMaskedLM, pipeline

    from . import SparseBertForMaskedLM
    from .evaluation import masked_lm_metrics
    from .mlm import offline_mlm_corpus, small_bert_config, train_mlm
    from .plotting import plot_patterns

    os.makedirs(args.out, exist_ok=True)
    corpus = offline_mlm_corpus(
        args.lang,
        max_sentences=args.train_sentences + args.eval_sentences,
        eval_sentences=args.eval_sentences,
        vocab_size=args.vocab_size,
        block_size=args.max_length,
        seed=args.seed,
    )
    print(
        f"corpus: {len(corpus.train)} training / {len(corpus.eval)} held-out blocks of {args.max_length} tokens "
        f"from {args.train_sentences} + {args.eval_sentences} English gettext messages"
    )
    torch.manual_seed(args.seed)
    model = SparseBertForMaskedLM(small_bert_config(corpus.tokenizer, args.max_length, attention_pattern=args.pattern))
    train_mlm(model, corpus, args.out, steps=args.steps, seed=args.seed)
    metrics = masked_lm_metrics(model, corpus.tokenizer, corpus.eval)
    print(
        f"held-out masked-LM with pattern {args.pattern!r}: accuracy {metrics['accuracy']:.3f}, "
        f"loss {metrics['loss']:.3f}, perplexity {metrics['perplexity']:.1f} ({metrics['masked_tokens']} tokens)"
    )
    model_dir = os.path.join(args.out, "model")
    model.save_pretrained(model_dir)
    corpus.tokenizer.save_pretrained(model_dir)
    reloaded = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True)
    again = masked_lm_metrics(reloaded, corpus.tokenizer, corpus.eval)
    print(f"saved to {model_dir}; reloaded with AutoModelForMaskedLM: accuracy {again['accuracy']:.3f} (same masks)")
    fill = pipeline("fill-mask", model=reloaded, tokenizer=corpus.tokenizer)
    example = f"could not open {corpus.tokenizer.mask_token} file"
    print(f"fill-mask {example!r}: " + ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(example)))
    png = os.path.join(args.out, "pattern.png")
    plot_patterns([args.pattern], args.max_length, png, columns=1)
    print(f"pattern heatmap: {png}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-sparse", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("patterns", help="sparsity of pattern specs, optionally as heatmaps")
    p.add_argument("specs", nargs="*", help="pattern specs (default: the SparseBERT paper's patterns)")
    p.add_argument("--n", type=int, default=128, help="sequence length")
    p.add_argument("--png", help="write heatmaps to this PNG")
    p.add_argument("--list", action="store_true", help="list every valid spec")
    p.set_defaults(run=cmd_patterns)

    p = commands.add_parser("demo", help="train a small SparseBERT on offline text, evaluate, save, reload")
    p.add_argument("--pattern", default="bigbird:3,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lang", default="de", help="gettext catalogue language whose English messages are the corpus")
    p.add_argument("--train-sentences", type=int, default=8000)
    p.add_argument("--eval-sentences", type=int, default=1000)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/demo")
    p.set_defaults(run=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:  # bad specs and settings: the message says what is valid
        sys.exit(f"hf-sparse {args.command}: {error}")


if __name__ == "__main__":
    main()
