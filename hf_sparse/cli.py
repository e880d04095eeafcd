"""The ``hf-sparse`` command.

hf-sparse patterns [SPEC ...] [--n 128] [--png patterns.png]   sparsity table (+ heatmaps) of pattern specs
hf-sparse demo [--pattern bigbird:3,1,2] [--steps 300]         train, evaluate, save and reload a SparseBERT
hf-sparse dam [--structure offset] [--target-sparsity 0.9]     learn a DAM mask (SparseBERT), freeze, train on
hf-sparse sparsefinder [--model DIR] [--method distance]       fit Sparsefinder predictors on an entmax SparseBERT
hf-sparse card DIR [--metrics metrics.json]                    write the model card of a saved checkpoint
hf-sparse benchmark [--patterns SPEC ...] [--lengths N ...]    sparse kernels and whole layers vs dense SDPA (CPU)

Every command that trains works offline on the English gettext messages of this machine (``hf_sparse.data``), saves
the model with its tokenizer, ``metrics.json`` and a model card (``README.md``) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    _save_with_card(
        model,
        corpus.tokenizer,
        model_dir,
        {"held_out_mlm_accuracy": metrics["accuracy"], "held_out_mlm_loss": metrics["loss"]},
        title=f"Small SparseBERT ({args.pattern})",
        dataset="English gettext messages (held-out)",
    )
    reloaded = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True)
    again = masked_lm_metrics(reloaded, corpus.tokenizer, corpus.eval)
    print(f"saved to {model_dir}; reloaded with AutoModelForMaskedLM: accuracy {again['accuracy']:.3f} (same masks)")
    fill = pipeline("fill-mask", model=reloaded, tokenizer=corpus.tokenizer)
    example = f"could not open {corpus.tokenizer.mask_token} file"
    print(f"fill-mask {example!r}: " + ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(example)))
    png = os.path.join(args.out, "pattern.png")
    plot_patterns([args.pattern], args.max_length, png, columns=1)
    print(f"pattern heatmap: {png}")


def _save_with_card(model, tokenizer, directory: str, metrics: dict, **card_kwargs) -> None:
    """Checkpoint + tokenizer + metrics.json + README.md (model card) in ``directory``."""
    import json

    from .cards import write_card

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2)
    card = write_card(model, directory, repo_id=directory, metrics=metrics, **card_kwargs)
    print(f"model, tokenizer, metrics.json and model card written to {directory} ({card.name})")


def cmd_dam(args: argparse.Namespace) -> None:
    """SparseBERT's DAM on a small masked-LM: search the mask, freeze it, train on with it, report and save."""
    import torch

    from . import SparseBertForMaskedLM
    from .evaluation import masked_lm_metrics
    from .mlm import offline_mlm_corpus, search_and_train_dam, small_bert_config

    dam = {"structure": args.structure, "max_length": args.max_length, "penalty_reduction": "sum"}
    if args.structure == "block":
        dam["block_size"] = args.block_size
    corpus = offline_mlm_corpus(
        args.lang, args.max_sentences, args.eval_sentences, args.vocab_size, args.max_length, args.seed
    )
    print(f"corpus: {len(corpus.train)} training / {len(corpus.eval)} held-out blocks of {args.max_length} tokens")
    torch.manual_seed(args.seed)
    config = small_bert_config(corpus.tokenizer, args.max_length, attention_pattern=args.pattern, dam=dam)
    model = SparseBertForMaskedLM(config)
    done = search_and_train_dam(
        model,
        corpus,
        args.out,
        args.steps,
        search_steps=args.search_steps,
        target_sparsity=args.target_sparsity,
        penalty=args.penalty,
        gate_learning_rate=args.gate_lr,
        seed=args.seed,
    )
    metrics = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    metrics = {
        "mask_sparsity": done["sparsity"],
        "held_out_mlm_accuracy": metrics["accuracy"],
        "held_out_mlm_loss": metrics["loss"],
        "search_steps": done["search_steps"],
        "frozen_mask_steps": done["train_steps"],
    }
    print(
        f"DAM ({args.structure}): searched {done['search_steps']} steps, mask sparsity {100 * done['sparsity']:.1f} %, "
        f"then {done['train_steps']} steps with the frozen mask; held-out masked-LM accuracy "
        f"{metrics['held_out_mlm_accuracy']:.3f}, loss {metrics['held_out_mlm_loss']:.3f}; "
        f"pattern now {model.config.attention_pattern!r}"
    )
    _save_with_card(
        model,
        corpus.tokenizer,
        os.path.join(args.out, "model"),
        metrics,
        title=f"SparseBERT with a learned DAM mask ({args.structure})",
        dataset="English gettext messages (held-out)",
    )


def cmd_sparsefinder(args: argparse.Namespace) -> None:
    """Sparsefinder on an entmax SparseBERT: fit the predictors, sweep, pick an operating point, report and save."""
    import torch
    from transformers import AutoTokenizer

    from . import SparseBertConfig, SparseBertForMaskedLM
    from .evaluation import DEFAULT_SWEEP, masked_lm_metrics, operating_point, pareto, predictor_like
    from .mlm import corpus_for_tokenizer, fixed_mask_batches, offline_mlm_corpus, small_bert_config, train_mlm
    from .sparsefinder import CENTROID_METHODS, resolve_config
    from .sparsefinder_fit import collect_attention, fit

    os.makedirs(args.out, exist_ok=True)
    if args.model:
        source = args.model
        source_config = SparseBertConfig.from_pretrained(source)
        limit = source_config.max_position_embeddings
        if args.max_length > limit:
            raise ValueError(f"--max-length {args.max_length} exceeds the model's max_position_embeddings {limit}")
        tokenizer = AutoTokenizer.from_pretrained(source)
        corpus = corpus_for_tokenizer(
            tokenizer, args.lang, args.max_sentences, args.eval_sentences, args.max_length, args.seed
        )
    else:
        corpus = offline_mlm_corpus(
            args.lang, args.max_sentences, args.eval_sentences, args.vocab_size, args.max_length, args.seed
        )
        torch.manual_seed(args.seed)
        softmax = SparseBertForMaskedLM(small_bert_config(corpus.tokenizer, args.max_length))
        print(f"pre-training a small softmax BERT for {args.pretrain_steps} steps (no --model given)")
        train_mlm(softmax, corpus, args.out, steps=args.pretrain_steps, seed=args.seed)
        source = os.path.join(args.out, "softmax")
        softmax.save_pretrained(source)
        source_config = softmax.config
    settings = resolve_config({"method": args.method, "projection_dim": args.projection_dim, "window": args.window})
    fn = source_config.attention_fn
    model = SparseBertForMaskedLM.from_pretrained(
        source, attention_fn="entmax15" if fn == "softmax" else fn, sparsefinder=settings
    )
    if fn == "softmax" and args.entmax_steps:
        print(f"softmax checkpoint: fine-tuning to 1.5-entmax attention for {args.entmax_steps} steps")
        train_mlm(model, corpus, args.out, steps=args.entmax_steps, learning_rate=5e-4, seed=args.seed)

    fit_data = fixed_mask_batches(corpus.train[: args.fit_blocks], corpus.tokenizer, seed=args.seed)
    eval_data = fixed_mask_batches(corpus.eval[: args.eval_blocks], corpus.tokenizer, seed=args.seed + 1)
    fit(model, fit_data, epochs=args.epochs, max_sentences=args.fit_blocks)
    png = os.path.join(args.out, "pareto.png")
    csv = os.path.join(args.out, "pareto.csv")
    rows = pareto(model, eval_data, {args.method: DEFAULT_SWEEP[args.method]}, csv_path=csv, png_path=png)
    point = operating_point(rows, args.method, args.recall)
    chosen = resolve_config({**settings, **point["overrides"]})
    if args.method in CENTROID_METHODS:  # k-means centroids for the chosen number of clusters; projections are kept
        collected = collect_attention(model, fit_data, max_sentences=args.fit_blocks, progress=False)
        for layer, module in model.sparsefinder_modules().items():
            module.sparsefinder = predictor_like(module.sparsefinder, chosen, collected[layer])
    model.config.sparsefinder = chosen
    full = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    model.config.sparsefinder = {**chosen, "enabled": True}
    sparse = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    metrics = {
        "gold_sparsity": point["gold_sparsity"],
        "graph_sparsity": point["graph_sparsity"],
        "recall": point["recall"],
        "held_out_mlm_accuracy_full_entmax": full["accuracy"],
        "held_out_mlm_accuracy_predicted_sparse": sparse["accuracy"],
    }
    print(
        f"{args.method} at {point['setting']} (sparsest with recall >= {args.recall}): graph sparsity "
        f"{point['graph_sparsity']:.3f} (entmax drops {point['gold_sparsity']:.3f}), recall {point['recall']:.3f}; "
        f"held-out masked-LM accuracy {full['accuracy']:.3f} full entmax, {sparse['accuracy']:.3f} predicted-sparse"
    )
    model_dir = os.path.join(args.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    shutil.copy(png, os.path.join(model_dir, "pareto.png"))
    _save_with_card(
        model,
        corpus.tokenizer,
        model_dir,
        metrics,
        title=f"Entmax SparseBERT with Sparsefinder ({args.method})",
        dataset="English gettext messages (held-out)",
        plots={f"{args.method}: predicted-graph sparsity vs recall": "pareto.png"},
    )


def cmd_card(args: argparse.Namespace) -> None:
    """The model card of a saved hf_sparse checkpoint, from its config, state and (optional) metrics."""
    import json

    from transformers import AutoConfig

    import hf_sparse

    from .cards import write_card

    architectures = AutoConfig.from_pretrained(args.model).architectures or []
    classes = [getattr(hf_sparse, name) for name in architectures if hasattr(hf_sparse, name)]
    if not classes:
        raise ValueError(
            f"{args.model} holds {architectures or 'no architectures'}, not an hf_sparse model "
            f"(valid: {', '.join(n for n in hf_sparse.__all__ if n[0].isupper() and not n.endswith('Config'))})"
        )
    model = classes[0].from_pretrained(args.model)
    metrics_path = args.metrics or os.path.join(args.model, "metrics.json")
    metrics = None
    if os.path.exists(metrics_path):
        with open(metrics_path) as handle:
            metrics = json.load(handle)
    elif args.metrics:
        raise ValueError(f"--metrics {args.metrics}: no such file")
    out = args.out or args.model
    os.makedirs(out, exist_ok=True)
    plots = {}
    for image in args.plot or []:
        if not os.path.isfile(image):
            raise ValueError(f"--plot {image}: no such file")
        name = os.path.basename(image)
        if os.path.abspath(os.path.dirname(image)) != os.path.abspath(out):
            shutil.copy(image, os.path.join(out, name))
        plots[os.path.splitext(name)[0].replace("_", " ")] = name
    card = write_card(
        model,
        out,
        repo_id=args.repo_id or args.model,
        title=args.title,
        description=args.description or "",
        metrics=metrics,
        dataset=args.dataset,
        base_model=args.base_model,
        plots=plots,
    )
    print(f"model card written to {card}")


def cmd_benchmark(args: argparse.Namespace) -> None:
    """Forward time of the sparse kernels against dense SDPA, alone and inside a whole layer with the model's mask
    building, after checking them against float64 (kernels) and eager (layers) references."""
    import torch

    from .benchmarking import TOLERANCE, KernelMismatch, bench_layer, bench_one
    from .patterns import parse

    for spec in args.patterns:
        parse(spec)  # every spec before the first (slow) row: a typo fails at once
    for name in ("lengths", "heads", "head_dim", "repeats"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {values}")
    torch.manual_seed(0)
    print(
        f"forward-only timings on CPU ({torch.get_num_threads()} threads), B=1, H={args.heads}, D={args.head_dim}, "
        f"float32: ratios to dense SDPA measured side by side in this run (round-robin, medians of {args.repeats} "
        f"rounds); max |diff| is to a float64 eager reference (must be < {TOLERANCE:g}). These are not the committed "
        "numbers: scripts/benchmark_attention.py and scripts/benchmark_model_masks.py write those (benchmarks/)."
    )
    print(
        f"{'pattern':<20} {'L':>6} {'block density':>13} {'dense SDPA (ms)':>15} {'sdpa-masked/dense':>17} "
        f"{'flex/dense':>10} {'tiles/dense':>11} {'max |diff|':>10}"
    )
    for spec in args.patterns:
        for n in args.lengths:
            try:
                row = bench_one(spec, n, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
            except KernelMismatch as error:
                sys.exit(f"hf-sparse benchmark: {error}")
            print(
                f"{spec:<20} {n:>6} {row['block_density']:>13.3f} {row['dense'] * 1e3:>15.2f} {row['sdpa']:>17.2f} "
                f"{row['flex']:>10.2f} {row['tiles']:>11.2f} {row['max_diff']:>10.1e}",
                flush=True,
            )
    print(
        f"\nwhole layer (hidden {args.heads * args.head_dim}, FFN 4x), the model's mask building included; "
        "overhead = layer / (dense layer's other parts + bare kernel)"
    )
    print(
        f"{'layer':<6} {'pattern':<20} {'L':>6} {'dense layer (ms)':>16} {'flex/dense':>10} {'tiles/dense':>11} "
        f"{'flex overhead':>13} {'tiles overhead':>14} {'max |diff|':>10}"
    )
    for spec in args.patterns:
        for n in args.lengths:
            row = bench_layer(spec, n, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
            print(
                f"{'layer':<6} {spec:<20} {n:>6} {row['dense_layer'] * 1e3:>16.2f} {row['layer_flex']:>10.2f} "
                f"{row['layer_tiles']:>11.2f} {row['overhead_flex']:>13.2f} {row['overhead_tiles']:>14.2f} "
                f"{row['max_diff']:>10.1e}",
                flush=True,
            )


def _whole(least: int):
    """argparse type: a whole number >= ``least``, checked before any work starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {text!r}")
        return value

    return parse


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number in the interval given (open ends where said)."""
    interval = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
        if not (inside and value == value and value not in (float("inf"), float("-inf"))):
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return value

    return parse


def _corpus_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """Options of the commands that train on the offline corpus (``mlm.offline_mlm_corpus``) and save under --out."""
    p.add_argument("--lang", default="de", help="gettext catalogue language whose English messages are the corpus")
    p.add_argument("--vocab-size", type=_whole(1), default=4000)
    p.add_argument("--max-length", type=_whole(1), default=128)
    p.add_argument("--max-sentences", type=_whole(1), default=None, help="use only this many messages (default: all)")
    p.add_argument("--eval-sentences", type=_whole(1), default=2000, help="held-out messages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-sparse", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("patterns", help="sparsity of pattern specs, optionally as heatmaps")
    p.add_argument("specs", nargs="*", help="pattern specs (default: the SparseBERT paper's patterns)")
    p.add_argument("--n", type=_whole(1), default=128, help="sequence length")
    p.add_argument("--png", help="write heatmaps to this PNG")
    p.add_argument("--list", action="store_true", help="list every valid spec")
    p.set_defaults(run=cmd_patterns)

    p = commands.add_parser("demo", help="train a small SparseBERT on offline text, evaluate, save, reload")
    p.add_argument("--pattern", default="bigbird:3,1,2")
    p.add_argument("--steps", type=_whole(1), default=300)
    p.add_argument("--lang", default="de", help="gettext catalogue language whose English messages are the corpus")
    p.add_argument("--train-sentences", type=_whole(1), default=8000)
    p.add_argument("--eval-sentences", type=_whole(1), default=1000)
    p.add_argument("--vocab-size", type=_whole(1), default=2000)
    p.add_argument("--max-length", type=_whole(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/demo")
    p.set_defaults(run=cmd_demo)

    p = commands.add_parser("dam", help="learn a DAM attention mask (SparseBERT) on offline text, freeze, train on")
    p.add_argument("--structure", default="offset", choices=["offset", "element", "block"])
    p.add_argument("--block-size", type=_whole(1), default=16, help="block structure: tokens per block")
    p.add_argument("--pattern", default="dense", help="fixed pattern the search runs inside")
    p.add_argument(
        "--target-sparsity", type=_number(0, 1, True, True), default=0.9, help="stop the search at this mask sparsity"
    )
    p.add_argument("--steps", type=_whole(1), default=300, help="search + frozen-mask training steps")
    p.add_argument("--search-steps", type=_whole(1), default=None, help="at most this many search steps (default half)")
    p.add_argument("--penalty", type=_number(0), default=1e-4, help="final λ on the summed mask (rises from 0)")
    p.add_argument("--gate-lr", type=_number(0, low_open=True), default=0.05)
    _corpus_arguments(p, out="outputs/dam")
    p.set_defaults(run=cmd_dam)

    p = commands.add_parser("sparsefinder", help="fit Sparsefinder predictors on an entmax SparseBERT, sweep, save")
    p.add_argument("--model", help="SparseBERT/BERT masked-LM checkpoint with tokenizer; default: pre-train one")
    p.add_argument("--method", default="distance", choices=["distance", "quantization", "clustering"])
    p.add_argument("--projection-dim", type=_whole(1), default=4)
    p.add_argument("--window", type=_whole(0), default=1, help="always-attended local window")
    p.add_argument(
        "--recall",
        type=_number(0, 1, low_open=True),
        default=0.9,
        help="operating point: sparsest sweep point with this recall",
    )
    p.add_argument(
        "--pretrain-steps", type=_whole(1), default=200, help="softmax pre-training when no --model is given"
    )
    p.add_argument("--entmax-steps", type=_whole(1), default=100, help="entmax fine-tuning of a softmax checkpoint")
    p.add_argument("--epochs", type=_whole(1), default=5, help="projection-fitting epochs")
    p.add_argument("--fit-blocks", type=_whole(1), default=64)
    p.add_argument("--eval-blocks", type=_whole(1), default=64)
    _corpus_arguments(p, out="outputs/sparsefinder")
    p.set_defaults(run=cmd_sparsefinder)

    p = commands.add_parser("card", help="write the model card (README.md) of a saved hf_sparse checkpoint")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--metrics", help="JSON file of name -> value (default: metrics.json in the checkpoint, if any)")
    p.add_argument("--dataset", help="name of the evaluation data, for the card's eval results")
    p.add_argument("--base-model", help="Hub id of the model this one was trained from")
    p.add_argument("--repo-id", help="id shown in the loading snippet (default: the directory)")
    p.add_argument("--title")
    p.add_argument("--description", help="the card's first paragraph (default: names the class and hf_sparse)")
    p.add_argument("--plot", action="append", help="an image to show in the card (copied next to it); repeatable")
    p.add_argument("--out", help="directory for README.md (default: the checkpoint)")
    p.set_defaults(run=cmd_card)

    p = commands.add_parser(
        "benchmark", help="forward time of the sdpa / flex / tiles kernels and whole layers vs dense SDPA, on this CPU"
    )
    p.add_argument("--patterns", nargs="+", default=["window:64", "bigbird:64,1,3"], metavar="SPEC")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], metavar="N")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (medians reported)")
    p.set_defaults(run=cmd_benchmark)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:  # bad specs and settings: the message says what is valid
        sys.exit(f"hf-sparse {args.command}: {error}")


if __name__ == "__main__":
    main()
