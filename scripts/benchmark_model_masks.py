"""What a sparse pattern costs inside the model, per forward, on CPU: time, memory, compilations.

Sections of the report (``benchmarks/model_masks_cpu.md``), every ratio measured side by side in one run:

1. **Whole layer.** One BERT-base layer (hidden 768, 12 heads) with the model's own mask building
   (``SparseBertModel.attention_masks_for``: cache lookups and padding), forward, against the dense SDPA layer;
   and the model's overhead over the bare kernel (:func:`hf_sparse.benchmarking.bench_layer`).
2. **Memory.** Extra peak resident memory of a forward (first, and steady state once masks are cached), each in
   a fresh process (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``), against the dense L×L
   float32 score matrix ``B·H·L²·4`` bytes.
3. **Frozen DAM.** A 16-token forward of an element-DAM model with ``max_length`` 4096: what the per-forward
   unpacking of the stored mask used to cost, and what a forward costs now.
4. **Sparsefinder.** Predicted-sparse encoder attention at L = 2048 (a distance predictor fitted on attention
   with local structure, and the window baseline) against dense entmax on the same input, same outputs.
5. **Many patterns.** The steady-state forward of one pattern before and after twenty other patterns ran in the
   same process (compilations, recompile limits, caches), per kernel.

    python scripts/benchmark_model_masks.py [--quick] [--output benchmarks/model_masks_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without installing the package

from hf_sparse import attention, sparsefinder  # noqa: E402
from hf_sparse.benchmarking import bench_layer, bert_layer, machine, measure  # noqa: E402
from hf_sparse.sparsefinder_fit import FitBatch, fit_projections, gold_graph  # noqa: E402

# dynamo giving up (recompile limit) runs FlexAttention unfused: that must fail here, not time the wrong kernel
warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "model_masks_cpu.md")
    parser.add_argument("--child-memory", nargs=4, metavar=("SPEC", "L", "BACKEND", "BATCH"), help=argparse.SUPPRESS)
    return parser.parse_args()


# -- 2. memory, measured in a child process ---------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_of(fn) -> float:
    """Extra peak resident memory (MiB) while ``fn`` runs, above the resident memory before it."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def child_memory(spec: str, n: int, backend: str, batch: int) -> None:
    _, forward = bert_layer(spec, n, backend)
    x = torch.randn(batch, n, 768)
    valid = torch.ones(batch, n, dtype=torch.long)
    valid[-1, n - n // 8 :] = 0  # padding in the last row: masks are combined with it every forward
    with torch.no_grad():
        first = _peak_of(lambda: forward(x, valid))
        steady = _peak_of(lambda: forward(x, valid))
    print(json.dumps({"first": first, "steady": steady}))


def memory_row(spec: str, n: int, backend: str, batch: int) -> dict:
    command = [sys.executable, __file__, "--child-memory", spec, str(n), backend, str(batch)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    scores = batch * 12 * n * n * 4 / MIB
    return {"pattern": spec, "L": n, "backend": backend, "batch": batch, "scores_mib": scores, **row}


# -- 3. frozen DAM ------------------------------------------------------------------------------------------------


def frozen_dam(max_length: int, repeats: int) -> dict:
    from hf_sparse import SparseBertConfig, SparseBertModel
    from hf_sparse.dam import _unpack_bits

    config = SparseBertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=max_length,
        dam={"structure": "element", "max_length": max_length, "init_noise": 1.0},
    )
    model = SparseBertModel(config).eval()
    model.freeze_dam()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        start = time.perf_counter()
        model(ids)  # unpacks the stored mask once
        first = time.perf_counter() - start
        dam = model.dam
        times = measure(
            {
                "dense": lambda: model(ids),
                "unpack": lambda: dam.expand(_unpack_bits(dam.frozen_mask, max_length), max_length),
            },
            repeats,
            warmup=1,
        )
    return {"max_length": max_length, "first": first, "forward": times["dense"], "unpack": times["unpack"]}


# -- 4. Sparsefinder ----------------------------------------------------------------------------------------------


def local_attention_inputs(n: int, heads: int = 12, d: int = 64, seed: int = 0):
    """Queries and keys whose dot products fall off with distance (sinusoidal positions plus noise), as in a
    trained encoder's local heads: entmax then keeps mostly nearby keys, and a predictor can learn it."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.exp(torch.linspace(0, -6, d // 2))[None, :]
    sinus = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], -1) * 1.6  # (n, d)
    q = sinus + 0.4 * torch.randn(1, heads, n, d, generator=g)
    k = sinus + 0.4 * torch.randn(1, heads, n, d, generator=g)
    v = torch.randn(1, heads, n, d, generator=g)
    return q, k, v


def sparsefinder_rows(n: int, repeats: int, recall_target: float = 0.95) -> list[dict]:
    q, k, v = local_attention_inputs(n)
    scaling = q.shape[-1] ** -0.5
    with torch.no_grad():
        probs = attention.normalize(torch.matmul(q, k.transpose(-1, -2)) * scaling, None, "entmax15", 1.5)
    gold = gold_graph(probs, None, causal=False)
    del probs
    crop = min(n, 512)  # the projections are fitted on a crop (the structure is the same along the sequence)
    fit_batch = FitBatch(q[:, :, :crop], k[:, :, :crop], gold[:, :, :crop, :crop], torch.ones(1, 1, crop, crop) > 0)
    fitted = sparsefinder.SparsefinderLayer({"method": "distance", "projection_dim": 4, "window": 8}, 12, 64)
    fit_projections(fitted, [fit_batch], {"method": "distance", "projection_dim": 4, "window": 8}, epochs=30, lr=0.05)
    candidates = [("window", sparsefinder.SparsefinderLayer({"method": "window"}, 12, 64), {"window": 64})]
    for threshold in (0.2, 0.3, 0.5, 0.7, 1.0):  # the sparsest threshold that reaches the recall target
        settings = {"method": "distance", "projection_dim": 4, "window": 8, "threshold": threshold}
        pairs = sparsefinder.predict_pairs(fitted, q, k, settings, None, causal=False)
        if ((pairs & gold).sum() / gold.sum()).item() >= recall_target:
            candidates.append((f"distance (fitted), threshold {threshold}", fitted, settings))
            break
    rows = []
    for name, layer, extra in candidates:
        settings = {"method": layer.settings["method"], **extra}
        pairs = sparsefinder.predict_pairs(layer, q, k, settings, None, causal=False)
        recall = ((pairs & gold).sum() / gold.sum()).item()
        sparsity = 1 - pairs.float().mean().item()
        with torch.no_grad():
            predicted = sparsefinder.attend_predicted(
                layer, q, k, v, settings, where="bench", scaling=scaling, attention_fn="entmax15", alpha=1.5
            )[0]
            masked = attention.attend(
                q, k, v, attention.AttentionMask("eager", keep=pairs), scaling=scaling, attention_fn="entmax15"
            )[0]
            del pairs
            times = measure(
                {
                    "dense": lambda: attention.attend(
                        q, k, v, attention.AttentionMask("eager"), scaling=scaling, attention_fn="entmax15"
                    ),
                    "predicted": lambda layer=layer, settings=settings: sparsefinder.attend_predicted(
                        layer, q, k, v, settings, where="b", scaling=scaling, attention_fn="entmax15", alpha=1.5
                    ),
                },
                repeats,
                warmup=1,
            )
        rows.append(
            {
                "predictor": name,
                "L": n,
                "graph_sparsity": sparsity,
                "gold_sparsity": 1 - gold.float().mean().item(),
                "recall": recall,
                "max_diff": (predicted - masked).abs().max().item(),
                "dense": times["dense"],
                "predicted": times["predicted"],
            }
        )
    return rows


# -- 5. many patterns ---------------------------------------------------------------------------------------------


def many_patterns(n: int, repeats: int) -> list[dict]:
    others = [f"window:{w}" for w in (3, 9, 17, 33, 96)] + ["global:2", "strided:128", "fixed:128,8", "logsparse"]
    others += ["dilated:16,4", "block_local:256", "star", "longformer:32,2", "bigbird:32,1,2", "causal"]
    others += ["no_diagonal", "window:48&causal", "window:40+global:3", "block_local:128+strided:512", "random:4"]
    assert len(others) == 20
    rows = []
    for backend in ("tiles", "flex"):
        torch._dynamo.reset()
        x = torch.randn(1, n, 768)
        model, forward = bert_layer("window:64", n, backend)
        with torch.no_grad():
            before = measure({"dense": lambda forward=forward, x=x: forward(x)}, repeats, warmup=1)["dense"]
            for spec in others:
                model.config.attention_pattern = spec
                forward(x)
                forward(x)
            model.config.attention_pattern = "window:64"
            after = measure({"dense": lambda forward=forward, x=x: forward(x)}, repeats, warmup=1)["dense"]
        rows.append({"backend": backend, "L": n, "before": before, "after": after})
    return rows


# -- report -------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.child_memory:
        spec, n, backend, batch = args.child_memory
        child_memory(spec, int(n), backend, int(batch))
        return
    quick = args.quick
    repeats = 2 if quick else args.repeats
    began = time.perf_counter()
    load_before = os.getloadavg()

    layer_cases = [("window:64", 512)] if quick else [("window:64", n) for n in (2048, 4096, 8192)]
    layer_cases += [] if quick else [("longformer:64,1", 4096), ("longformer:64,1", 8192)]
    layers = []
    for spec, n in layer_cases:
        layers.append(bench_layer(spec, n, repeats=repeats))
        r = layers[-1]
        print(f"layer {spec} L={n}: flex {r['layer_flex']:.2f}, tiles {r['layer_tiles']:.2f} of dense", flush=True)

    memory_n = 512 if quick else 4096
    memory = []
    for backend, batch, spec in [
        ("sdpa", 1, "dense"),
        ("sdpa", 1, "window:64"),
        ("tiles", 1, "window:64"),
        ("sdpa", 4, "dense"),
        ("flex", 4, "window:64"),
        ("tiles", 4, "window:64"),
    ]:
        memory.append(memory_row(spec, memory_n, backend, batch))
        print(f"memory {memory[-1]}", flush=True)

    dam = frozen_dam(512 if quick else 4096, repeats)
    print(f"frozen dam {dam}", flush=True)
    finder = sparsefinder_rows(256 if quick else 2048, repeats)
    print(f"sparsefinder {finder}", flush=True)
    many = many_patterns(256 if quick else 2048, repeats)
    print(f"many patterns {many}", flush=True)

    total = time.perf_counter() - began
    load = " / ".join(f"{x:.2f}" for x in (*load_before, *os.getloadavg()))
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])

    layer_table = [
        "| pattern | L | dense SDPA layer (ms) | flex layer / dense | tiles layer / dense | flex kernel / dense kernel "
        "| tiles kernel / dense kernel | flex layer / (dense parts + kernel) | tiles layer / (dense parts + kernel) "
        "| max abs diff to eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in layers:
        layer_table.append(
            f"| `{r['pattern']}` | {r['L']} | {r['dense_layer'] * 1e3:.0f} | {r['layer_flex']:.2f} "
            f"({1 / r['layer_flex']:.2f}x) | {r['layer_tiles']:.2f} ({1 / r['layer_tiles']:.2f}x) "
            f"| {r['kernel_flex']:.2f} | {r['kernel_tiles']:.2f} | {r['overhead_flex']:.2f} "
            f"| {r['overhead_tiles']:.2f} | {r['max_diff']:.1e} |"
        )
    memory_table = [
        "| pattern | backend | B | L | dense scores (MiB) | first forward: extra peak (MiB) | steady forward: extra "
        "peak (MiB) | steady, above the dense SDPA layer's (MiB) | that / dense scores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense_steady = {r["batch"]: r["steady"] for r in memory if r["pattern"] == "dense"}
    for r in memory:
        above = r["steady"] - dense_steady[r["batch"]]
        memory_table.append(
            f"| `{r['pattern']}` | {r['backend']} | {r['batch']} | {r['L']} | {r['scores_mib']:.0f} | {r['first']:.0f} "
            f"| {r['steady']:.0f} | {above:+.0f} | {above / r['scores_mib']:+.1%} |"
        )
    finder_table = [
        "| predictor | L | entmax's sparsity | graph sparsity | recall of entmax's pairs | dense entmax (ms) "
        "| predicted / dense | "
        "max abs diff to dense entmax on the predicted pairs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in finder:
        finder_table.append(
            f"| {r['predictor']} | {r['L']} | {r['gold_sparsity']:.3f} | {r['graph_sparsity']:.3f} | {r['recall']:.3f} "
            f"| {r['dense'] * 1e3:.0f} "
            f"| {r['predicted']:.2f} ({1 / r['predicted']:.2f}x) | {r['max_diff']:.1e} |"
        )
    many_table = [
        "| kernel | L | `window:64` layer (ms) before | after 20 other patterns / before |",
        "|---|---:|---:|---:|",
    ]
    for r in many:
        many_table.append(f"| {r['backend']} | {r['L']} | {r['before'] * 1e3:.1f} | {r['after'] / r['before']:.2f} |")
    nl = "\n"
    report = f"""# Sparse patterns inside the model: per-forward cost on CPU

Command (from the repository root): `{command}`

- Machine: {machine()}
- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}
- Date: {datetime.date.today().isoformat()}; total runtime {total / 60:.1f} min
- Load average (1/5/15 min) before / after: {load}
- Timing: `time.perf_counter`, variants interleaved round-robin for {repeats} rounds after a warm-up; a ratio is
  the median over rounds of (variant / baseline in the same round). Forward only under `torch.no_grad()`
  (FlexAttention has no backward on CPU). FlexAttention's compilation happens in the warm-up and is excluded.

## 1. Whole layer, mask building included

One BERT-base layer (hidden 768, 12 heads, FFN 3072), B=1, float32; the layer forward includes the model's
per-forward mask work (`attention_masks_for`). *Dense parts + kernel* is the dense SDPA layer minus its attention
kernel plus the bare sparse kernel with its mask prebuilt: the ratio shows what the model adds around the kernel.
Every layer output was checked against the eager layer first.

{nl.join(layer_table)}

## 2. Memory of a forward

Extra peak resident memory of one layer forward (fresh process per row; the last batch row has 1/8 padding),
against the float32 score matrix of dense attention (B·12·L²·4 bytes). *First* includes building and caching the
pattern's masks; *steady* is every later forward; *above the dense SDPA layer's* is what the pattern adds to the
same layer without one (the layer's own activations, FFN included, are in both). Peak RSS moves by a few tens of
MiB between identical runs (allocator, page reuse).

{nl.join(memory_table)}

## 3. Frozen element DAM, 16-token input, `max_length` {dam["max_length"]}

Two layers, 4 heads. Unpacking the stored bit-packed mask to every position, which each forward used to do:
{dam["unpack"] * dam["forward"] * 1e3:.1f} ms. Now it happens once (first forward {dam["first"] * 1e3:.0f} ms, including
it); every later forward takes {dam["forward"] * 1e3:.2f} ms.

## 4. Sparsefinder predicted-sparse encoder attention (entmax15), 12 heads, head dim 64

Queries and keys with local structure (sinusoidal positions plus noise: entmax keeps few keys, mostly nearby,
some at distances where the sinusoids align again). The distance predictor (r = 4, window 8) is fitted on a
512-token crop of this input's own entmax support, at the sparsest threshold that keeps 95 % of entmax's pairs
on the whole input; the window baseline keeps |i−j| ≤ 64. *Dense entmax* is matmul + exact top-k entmax15 +
matmul on all L² scores; *predicted* is `sparsefinder.attend_predicted` (blocks of {sparsefinder.QUERY_BLOCK}
queries on gathered {sparsefinder.KEY_BLOCK}-key tiles, or on all keys where a block's prediction touches more than
{sparsefinder.PREDICTED_MAX_TILE_DENSITY:.0%} of the tiles; each query's own keys where the most any query has,
times {sparsefinder.GATHER_COST}, is below the keys of those tiles). Its output equals dense entmax restricted to
the predicted pairs (last column).

{nl.join(finder_table)}

## 5. Twenty patterns in one process

The `window:64` layer's steady-state forward, then twenty other patterns (two forwards each, same process), then
`window:64` again. Before and after cannot be interleaved, so this ratio carries the machine's drift (±20 % here);
a fallback to unfused FlexAttention would show as 2-9x, and is an error in this script.

{nl.join(many_table)}
"""
    if not quick or args.output != REPO / "benchmarks" / "model_masks_cpu.md":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        print(f"wrote {args.output}")
    print(f"done in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
