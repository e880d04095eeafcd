"""CPU timing of exact entmax attention normalisers: the ``entmax`` package vs ``hf_sparse.entmax_topk`` vs softmax.

Inputs are attention-score tensors ``(1, H, L, L)`` in float32:

* random normal logits at several standard deviations (``--stds``), for every ``--lengths``;
* real scores captured from a small 1.5-entmax ``SparseBertForMaskedLM`` trained with masked LM on blocks of
  ``--train-length`` tokens of the offline English corpus (``hf_sparse.data.english_sentences``) for
  ``--train-seconds``, unless ``--no-real``; ``--model-dir`` keeps that model for the next run.

The same trained model is also timed whole (forward, and forward + backward of its masked-LM loss) with its
attention normaliser swapped: the ``entmax`` package, ``hf_sparse`` (what the model runs), and softmax.

For each input the functions are first run once and compared (outputs and gradients against the package; the
script aborts on a mismatch), then timed interleaved round-robin (``--repeats`` rounds, the package only in the
first ``--package-repeats``) with ``time.perf_counter``; medians are reported. "forward" runs under
``torch.no_grad()``; "forward+backward" is ``y = f(x); y.backward(dy)``. Writes a markdown report.

    python scripts/benchmark_entmax.py [--lengths ...] [--stds ...] [--repeats N] [--wait-load 1.5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import entmax
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without installing the package

from hf_sparse import entmax_topk  # noqa: E402

OUTPUT_TOL = 1e-6
GRAD_TOL = 1e-5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--stds", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians reported)")
    parser.add_argument("--package-repeats", type=int, default=3, help="rounds that also time the entmax package")
    parser.add_argument(
        "--package-repeats-long", type=int, default=1, help="the same for L >= 4096 (one package call takes ~20 s)"
    )
    parser.add_argument("--alpha", type=float, default=1.5, help="α of the entmax_bisect comparison")
    parser.add_argument("--bisect-lengths", type=int, nargs="*", default=[128, 512, 1024])
    parser.add_argument("--no-real", action="store_true", help="skip training a model for real attention scores")
    parser.add_argument("--train-seconds", type=float, default=600.0, help="time budget of the training")
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--model-dir", type=Path, default=None, help="load the trained model from here if saved")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--wait-load", type=float, default=None, help="wait until the 1-min load is below this")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for --wait-load at most")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "entmax_cpu.md")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wait_for_load(threshold: float | None, max_wait: float) -> str:
    if threshold is None:
        return "not waited for"
    start = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - start < max_wait:
        print(f"load {os.getloadavg()[0]:.2f} >= {threshold}: waiting", flush=True)
        time.sleep(15)
    waited = time.time() - start
    load = os.getloadavg()[0]
    met = "reached" if load < threshold else "not reached"
    return f"waited {waited:.0f} s for a 1-min load < {threshold} ({met}: {load:.2f})"


# ----------------------------------------------------------------------------------------------------------------
# Methods: name -> callable(x) for the forward, timed with and without backward
# ----------------------------------------------------------------------------------------------------------------


def entmax15_methods():
    return {
        "softmax": lambda x: torch.softmax(x, dim=-1),
        "entmax15": lambda x: entmax.entmax15(x, dim=-1),
        "ours": lambda x: entmax_topk.entmax15(x),
    }


def bisect_methods(alpha: float):
    return {
        "softmax": lambda x: torch.softmax(x, dim=-1),
        "entmax_bisect": lambda x: entmax.entmax_bisect(x, alpha=alpha, dim=-1),
        "ours": lambda x: entmax_topk.entmax_alpha(x, alpha),
    }


def run_forward(fn, x):
    with torch.no_grad():
        return fn(x)


def run_backward(fn, x, dy):
    leaf = x.detach().requires_grad_(True)
    fn(leaf).backward(dy)
    return leaf.grad


def check(methods, package: str, x, dy) -> dict:
    """Outputs and gradients of ours against the package; gold support sizes from the package output."""
    want = run_forward(methods[package], x)
    got = run_forward(methods["ours"], x)
    out_err = (got - want).abs().max().item()
    del got
    grad_err = (run_backward(methods["ours"], x, dy) - run_backward(methods[package], x, dy)).abs().max().item()
    support = (want > 0).sum(-1).flatten().float()
    if out_err > OUTPUT_TOL or grad_err > GRAD_TOL:
        raise SystemExit(f"mismatch against {package}: output {out_err:.2e}, gradient {grad_err:.2e}")
    return {
        "out_err": out_err,
        "grad_err": grad_err,
        "support": (
            int(support.median()),
            int(support.quantile(0.9)),
            int(support.max()),
        ),
    }


def time_methods(methods, package: str, x, dy, repeats: int, package_repeats: int) -> dict:
    times = {(name, mode): [] for name in methods for mode in ("fwd", "fwdbwd")}
    for round_ in range(repeats):
        for name, fn in methods.items():
            if name == package and round_ >= package_repeats:
                continue
            start = time.perf_counter()
            run_forward(fn, x)
            times[(name, "fwd")].append(time.perf_counter() - start)
            start = time.perf_counter()
            run_backward(fn, x, dy)
            times[(name, "fwdbwd")].append(time.perf_counter() - start)
    return {key: statistics.median(values) * 1e3 for key, values in times.items()}


def measure(label, x, methods, package, args) -> dict:
    torch.manual_seed(args.seed + 1)
    dy = torch.randn_like(x)
    info = check(methods, package, x, dy)
    info["k"] = entmax_topk.estimate_k(x, alpha=1.5 if package == "entmax15" else args.alpha)
    package_repeats = args.package_repeats if x.shape[-1] < 4096 else args.package_repeats_long
    info["ms"] = time_methods(methods, package, x, dy, args.repeats, package_repeats)
    info["package_repeats"] = package_repeats
    info["label"] = label
    ms = info["ms"]
    print(
        f"{label}: support {info['support']}, k {info['k']}, "
        + ", ".join(f"{name} {mode} {value:.1f} ms" for (name, mode), value in ms.items()),
        flush=True,
    )
    return info


# ----------------------------------------------------------------------------------------------------------------
# Real attention scores from a briefly trained 1.5-entmax SparseBERT
# ----------------------------------------------------------------------------------------------------------------


def package_normalize(scores, keep, attention_fn, alpha):
    """``hf_sparse.attention.normalize`` as it was before ``entmax_topk``: the package on masked scores."""
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    if attention_fn == "entmax15":
        probs = entmax.entmax15(scores, dim=-1)
    else:
        probs = entmax.entmax_bisect(scores, alpha=alpha, dim=-1)
    return probs if keep is None else probs * keep


def train_model(args, corpus):
    """The 1.5-entmax SparseBERT, trained for ``--train-seconds`` (or loaded from ``--model-dir``); a note."""
    from transformers import DataCollatorForLanguageModeling

    from hf_sparse import SparseBertForMaskedLM
    from hf_sparse.mlm import small_bert_config

    saved = args.model_dir is not None and (args.model_dir / "config.json").exists()
    if saved:
        model = SparseBertForMaskedLM.from_pretrained(args.model_dir)
        return model, (args.model_dir / "training.txt").read_text().strip() + f" Loaded from `{args.model_dir}`."
    length = args.train_length
    torch.manual_seed(args.seed)
    config = small_bert_config(corpus.tokenizer, block_size=length, attention_fn="entmax15", attention_backend="eager")
    model = SparseBertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(corpus.tokenizer, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warmup = 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    order = torch.randperm(len(corpus.train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    model.train()
    start, step, losses = time.time(), 0, []
    while time.time() - start < args.train_seconds:
        batch_ids = [order[(step * args.train_batch + i) % len(order)] for i in range(args.train_batch)]
        batch = collator([corpus.train[i] for i in batch_ids])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        step += 1
        if step % 20 == 0:
            print(f"step {step}: loss {statistics.mean(losses[-20:]):.2f}", flush=True)
    minutes = (time.time() - start) / 60
    note = (
        f'2-layer, 4-head, hidden-128 BERT (`small_bert_config`, attention_fn="entmax15", eager), masked-LM on '
        f"blocks of {length} tokens of the gettext English messages ({len(corpus.train)} blocks), batch "
        f"{args.train_batch}, AdamW lr 1e-3 ({warmup}-step warm-up): {step} steps "
        f"({step * args.train_batch / len(corpus.train):.1f} epochs) in {minutes:.1f} min (time budget "
        f"{args.train_seconds:.0f} s, training on `hf_sparse.entmax_topk`), loss {losses[0]:.2f} → "
        f"{statistics.mean(losses[-20:]):.2f} (mean of the last 20)."
    )
    if args.model_dir is not None:
        model.save_pretrained(args.model_dir)
        (args.model_dir / "training.txt").write_text(note)
    return model, note


def capture_scores(model, ids) -> list[torch.Tensor]:
    """The pre-normalisation attention scores of every layer on ``ids``."""
    from hf_sparse import attention

    captured = []
    original = attention.normalize

    def capture(scores, keep, attention_fn, alpha):
        captured.append(scores.detach().clone())
        return original(scores, keep, attention_fn, alpha)

    attention.normalize = capture
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        attention.normalize = original
    return captured


def time_model(model, batch, repeats: int, package_repeats: int) -> dict:
    """Whole-model forward and forward + backward with the normaliser swapped (checked against the package)."""
    from hf_sparse import attention

    ours = attention.normalize
    normalizers = {
        "softmax": lambda scores, keep, fn, alpha: ours(scores, keep, "softmax", alpha),
        "entmax15": package_normalize,
        "ours": ours,
    }

    def forward(name, grad):
        attention.normalize = normalizers[name]
        try:
            with torch.set_grad_enabled(grad):
                out = model(**batch)
                if grad:
                    out.loss.backward()
                    model.zero_grad(set_to_none=True)
            return out.logits.detach()
        finally:
            attention.normalize = ours

    err = (forward("ours", False) - forward("entmax15", False)).abs().max().item()
    if err > 1e-4:
        raise SystemExit(f"model logits differ from the package's by {err:.2e}")
    times = {(name, mode): [] for name in normalizers for mode in ("fwd", "fwdbwd")}
    for round_ in range(repeats):
        for name in normalizers:
            if name == "entmax15" and round_ >= package_repeats:
                continue
            for mode in ("fwd", "fwdbwd"):
                start = time.perf_counter()
                forward(name, mode == "fwdbwd")
                times[(name, mode)].append(time.perf_counter() - start)
    return {"ms": {key: statistics.median(v) * 1e3 for key, v in times.items()}, "logit_err": err}


def real_inputs(args):
    """Captured per-layer scores (label, (1, H', L, L)), the whole-model timing, and a note."""
    from transformers import DataCollatorForLanguageModeling

    from hf_sparse.mlm import offline_mlm_corpus

    length = args.train_length
    corpus = offline_mlm_corpus(block_size=length, vocab_size=4000, seed=args.seed)
    model, note = train_model(args, corpus)
    model.eval()
    heads = model.config.num_attention_heads
    sequences = max(1, args.heads // heads)
    ids = torch.tensor([corpus.eval[i]["input_ids"] for i in range(sequences)])
    captured = capture_scores(model, ids)
    real = [(f"real, layer {i}", s.reshape(1, -1, length, length).contiguous()) for i, s in enumerate(captured)]
    torch.manual_seed(args.seed)
    batch = DataCollatorForLanguageModeling(corpus.tokenizer, mlm_probability=0.15)(
        [corpus.eval[i] for i in range(sequences)]
    )
    timing = time_model(model, batch, args.repeats, args.package_repeats)
    note += (
        f" Scores captured on {sequences} held-out blocks, heads of the {sequences} sequences stacked: shape "
        f"(1, {sequences * heads}, {length}, {length}) per layer. Whole model: the same {sequences} blocks as one "
        f"batch, masked-LM loss; logits with ours vs the package differ by {timing['logit_err']:.1e}."
    )
    return real, timing, note


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def table(rows: list[dict], package: str) -> list[str]:
    lines = [
        f"| input | L | gold support median / p90 / max | k | softmax fwd | {package} fwd | ours fwd | "
        f"speed-up vs {package} | ours / softmax | softmax f+b | {package} f+b | ours f+b | "
        f"speed-up vs {package} | ours / softmax |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        cells = [r["label"], str(r["length"]), "{} / {} / {}".format(*r["support"]), str(r["k"])]
        for mode in ("fwd", "fwdbwd"):
            soft, pkg, ours = ms[("softmax", mode)], ms[(package, mode)], ms[("ours", mode)]
            cells += [f"{soft:.1f}", f"{pkg:.1f}", f"{ours:.1f}", f"**{pkg / ours:.1f}×**", f"{ours / soft:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    waited = wait_for_load(args.wait_load, args.max_wait)
    load_start = os.getloadavg()
    started = time.time()
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    real, model_timing, real_note = ([], None, "not run (--no-real)") if args.no_real else real_inputs(args)

    rows15, rows_bisect = [], []
    for length in args.lengths:
        for std in args.stds:
            torch.manual_seed(args.seed)
            x = torch.randn(1, args.heads, length, length) * std
            info = measure(f"normal, std {std:g}", x, entmax15_methods(), "entmax15", args)
            rows15.append({**info, "length": length})
            if length in args.bisect_lengths:
                info = measure(f"normal, std {std:g}", x, bisect_methods(args.alpha), "entmax_bisect", args)
                rows_bisect.append({**info, "length": length})
            del x
    for label, x in real:
        rows15.append({**measure(label, x, entmax15_methods(), "entmax15", args), "length": x.shape[-1]})
        info = measure(label, x, bisect_methods(args.alpha), "entmax_bisect", args)
        rows_bisect.append({**info, "length": x.shape[-1]})

    load_end = os.getloadavg()
    minutes = (time.time() - started) / 60
    lines = [
        "# Exact entmax on CPU: `hf_sparse.entmax_topk` vs the `entmax` package vs softmax",
        "",
        f"Command: `{command}`",
        "",
        f"- Date: {date}; total {minutes:.1f} min.",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}; "
        f"{platform.system()} {platform.machine()}.",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, entmax "
        f"{getattr(entmax, '__version__', '?')}.",
        f"- Load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load_start)}; at end: "
        f"{', '.join(f'{v:.2f}' for v in load_end)} ({waited}). Other jobs may share the cores.",
        f"- Inputs: float32 `(1, {args.heads}, L, L)`; gradients from `y.backward(dy)` with a fixed random `dy`.",
        f"- Timing: interleaved round-robin, median of {args.repeats} rounds ({args.package_repeats} for the "
        f"package, {args.package_repeats_long} at L ≥ 4096), `time.perf_counter`, after one untimed checking round; "
        "forward under `torch.no_grad()`; f+b = forward + backward. Times in ms.",
        "- Checked before timing: ours against the package, max |Δ| of outputs "
        f"≤ {OUTPUT_TOL:g} and of gradients ≤ {GRAD_TOL:g} (every row below passed; the largest: output "
        f"{max(r['out_err'] for r in rows15 + rows_bisect):.1e}, gradient "
        f"{max(r['grad_err'] for r in rows15 + rows_bisect):.1e}).",
        "- Gold support: number of nonzeros per row of the package's output. k: the first-pass candidates per row "
        "that `entmax15` chose (`estimate_k`: 90 % quantile of the supports of 32 sampled rows, rounded up to a "
        "multiple of 8); rows with a larger support are redone.",
        f"- Real scores: {real_note}",
        "",
        "## 1.5-entmax: `entmax.entmax15` vs `hf_sparse.entmax_topk.entmax15`",
        "",
        *table(rows15, "entmax15"),
        "",
        f"## α-entmax by bisection (α = {args.alpha:g}): `entmax.entmax_bisect` vs `entmax_topk.entmax_alpha`",
        "",
        *table(rows_bisect, "entmax_bisect"),
        "",
    ]
    if model_timing is not None:
        ms = model_timing["ms"]
        lines += [
            "## The trained model, whole: its attention normaliser swapped",
            "",
            "| normaliser | forward (ms) | forward + backward (ms) |",
            "|---|---:|---:|",
            *(
                f"| {label} | {ms[(name, 'fwd')]:.1f} | {ms[(name, 'fwdbwd')]:.1f} |"
                for name, label in (
                    ("softmax", "softmax"),
                    ("entmax15", "`entmax.entmax15` (the package)"),
                    ("ours", "`hf_sparse.entmax_topk.entmax15`"),
                )
            ),
            "",
            f"Speed-up of the whole model vs the package: forward "
            f"{ms[('entmax15', 'fwd')] / ms[('ours', 'fwd')]:.1f}×, forward + backward "
            f"{ms[('entmax15', 'fwdbwd')] / ms[('ours', 'fwdbwd')]:.1f}×; ours / softmax "
            f"{ms[('ours', 'fwd')] / ms[('softmax', 'fwd')]:.2f}× / "
            f"{ms[('ours', 'fwdbwd')] / ms[('softmax', 'fwdbwd')]:.2f}×.",
            "",
        ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
