"""Every kernel against a plain float64 reference: masked softmax written out by hand."""

import entmax
import pytest
import torch

from hf_sparse.attention import AttentionMask, attend, build_mask, choose_backend, normalize
from hf_sparse.entmax_triton import unavailable_reasons
from hf_sparse.patterns import dense_mask, parse
from test_entmax_in_models import PACKAGE, package_normalize


def reference(q, k, v, keep, fn="softmax"):
    """float64; rows with no allowed key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, -1) if fn == "softmax" else entmax.entmax15(scores, dim=-1)
    probs = probs.masked_fill(empty, 0.0)
    return (probs @ v).transpose(1, 2), probs


def inputs(b, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, n // 2 :] = False
    if b > 2:
        valid[2] = False  # a fully padded row: every query has no key
    return q, k, v, valid


SPECS = ["dense", "no_diagonal", "window:3+global:1", "bigbird:2,1,2", "strided:4", "block_local:4&causal"]


def pattern_with_padding(pattern, n, valid):
    """The reference mask: the pattern (random keys drawn among each row's own tokens) ∩ the real keys."""
    from hf_sparse.patterns import bind_rows, rows_mask

    if pattern.has_random:
        return rows_mask(bind_rows(pattern, valid), n, "cpu", valid.shape[0]) & valid[:, None, None, :]
    return dense_mask(pattern, n)[None] & valid[:, None, None, :]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dense_kernels_match_float64_reference_with_padding(spec, backend):
    q, k, v, valid = inputs(3, 2, 19, 8, seed=sum(map(ord, spec)))
    pattern = parse(spec)
    keep = pattern_with_padding(pattern, 19, valid)
    mask = build_mask(pattern, valid, 19, torch.device("cpu"), backend)
    out, probs = attend(q, k, v, mask, scaling=8**-0.5, output_attentions=True)
    want, want_probs = reference(q, k, v, keep)
    assert not torch.isnan(out).any()
    assert torch.allclose(out.double(), want, atol=1e-5)
    assert out[2].abs().max() == 0  # fully padded sequence: zeros, not NaN
    if backend == "eager":
        assert torch.allclose(probs.double(), want_probs, atol=1e-6)
        assert (probs[~keep.expand_as(probs)] == 0).all()  # exact zeros outside the pattern


@pytest.mark.parametrize("spec", ["window:20+global:1", "strided:16", "no_diagonal"])
def test_flex_block_sparse_matches_float64_reference_with_padding(spec):
    n = 256
    q, k, v, valid = inputs(3, 2, n, 16, seed=1)
    pattern = parse(spec)
    keep = dense_mask(pattern, n)[None] & valid[:, None, None, :]
    mask = build_mask(pattern, valid, n, torch.device("cpu"), "flex")
    with torch.no_grad():
        out, probs = attend(q, k, v, mask, scaling=16**-0.5)
    want, _ = reference(q, k, v, keep)
    assert probs is None
    assert not torch.isnan(out).any()
    assert torch.allclose(out.double(), want, atol=1e-5)
    assert out[2].abs().max() == 0


def test_sdpa_fully_masked_rows_have_finite_gradients():
    q, k, v, valid = inputs(3, 2, 10, 8, seed=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    mask = build_mask(parse("window:1"), valid, 10, torch.device("cpu"), "sdpa")
    out, _ = attend(q, k, v, mask, scaling=8**-0.5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("fn", sorted(PACKAGE))
@pytest.mark.parametrize("n", [9, 300])
def test_entmax_normalisers_equal_the_entmax_package_with_masks(fn, n):
    """normalize runs hf_sparse.entmax_topk; the package on -inf-masked scores is the reference (float64 and
    float32 outputs and gradients), with a sliding window, padding and a query with no key."""
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(2, 3, n, n, generator=g, dtype=torch.float64) * 3
    keep = dense_mask("window:40", n)[None].expand(2, 1, n, n).clone()
    keep[1, ..., n - n // 3 :] = False  # padding
    keep[1, :, 4] = False  # one query with no key at all
    dy = torch.randn(scores.shape, generator=g, dtype=torch.float64)
    for dtype, atol, gtol in ((torch.float64, 1e-10, 1e-8), (torch.float32, 1e-6, 1e-5)):
        x, x_ref = (scores.to(dtype).clone().requires_grad_(True) for _ in range(2))
        probs = normalize(x, keep, fn, 1.3)
        want = package_normalize(x_ref, keep, fn, 1.3)
        assert (probs - want).abs().max() <= atol
        assert (probs[~keep.expand_as(probs)] == 0).all() and probs[1, :, 4].abs().max() == 0
        assert ((probs == 0) & keep).any()  # exact zeros among the allowed keys
        (probs * dy.to(dtype)).sum().backward()
        (want * dy.to(dtype)).sum().backward()
        assert (x.grad - x_ref.grad).abs().max() <= gtol


def _choose(requested, **kw):
    args = dict(pattern=parse("window:64"), n=4096, device=torch.device("cpu"))
    return choose_backend(requested, **{**args, **kw})


def test_auto_backend_picks_by_what_is_possible_then_by_measured_crossover():
    assert _choose("auto") == "tiles"  # long and block-sparse, on CPU: no compiler needed
    assert _choose("auto", needs_grad=True) == "tiles"  # it trains
    assert _choose("auto", attention_fn="entmax15") == "tiles"  # and runs entmax
    assert _choose("auto", n=256) == "sdpa"  # below the crossover length
    assert _choose("auto", n=256, attention_fn="entmax15") == "eager"
    assert _choose("auto", pattern=parse("dense")) == "sdpa"
    assert _choose("auto", pattern=parse("window:4000")) == "sdpa"  # too dense for block sparsity to pay
    assert _choose("auto", output_attentions=True) == "eager"
    # FlexAttention where it compiles as data, from the length where it was measured to pay on a GPU
    assert _choose("auto", device=torch.device("cuda")) == "sdpa"
    assert _choose("auto", device=torch.device("cuda"), n=16384) == "flex"
    fused = "tiles" if unavailable_reasons("cuda") else "fused"  # the fused entmax kernel where triton is installed
    assert _choose("auto", device=torch.device("cuda"), attention_fn="entmax15") == fused


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(needs_grad=True), "no backward on CPU"),
        (dict(dropout=0.1), "attention dropout 0.1"),
        (dict(output_attentions=True), "output_attentions"),
        (dict(attention_fn="entmax15"), "not a softmax"),
    ],
)
def test_explicit_flex_refuses_what_it_cannot_do(kw, words):
    with pytest.raises(ValueError, match=words):
        _choose("flex", **kw)


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown attention_backend 'fast'.*eager, sdpa, flex, tiles"):
        _choose("fast")


def test_explicit_tiles_refuses_to_return_probabilities():
    with pytest.raises(ValueError, match="'tiles' does not return probabilities"):
        _choose("tiles", output_attentions=True)


def test_flex_stays_compiled_across_many_sequence_lengths():
    """Static-shape compilation would recompile per length and fall back to the unfused path after 8."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
        for n in range(130, 240, 10):  # 11 lengths
            q, k, v, valid = inputs(2, 2, n, 16, seed=n)
            pattern = parse("window:9")
            mask = build_mask(pattern, valid, n, torch.device("cpu"), "flex")
            with torch.no_grad():
                out, _ = attend(q, k, v, mask, scaling=16**-0.5)
            want, _ = reference(q, k, v, dense_mask(pattern, n)[None] & valid[:, None, None, :])
            assert torch.allclose(out.double(), want, atol=1e-5), n


@pytest.mark.parametrize("fn", ["softmax", "entmax15", "sparsemax"])
@pytest.mark.parametrize("spec", ["window:20+global:1", "strided:16", "block_local:64&causal", "no_diagonal"])
def test_tiles_kernel_matches_float64_reference_with_padding(spec, fn):
    n = 300
    q, k, v, valid = inputs(3, 2, n, 16, seed=2)
    q, k, v = q * 3, k * 3, v  # sharper scores: entmax keeps few keys, exact zeros inside the tiles
    pattern = parse(spec)
    keep = dense_mask(pattern, n)[None] & valid[:, None, None, :]
    mask = build_mask(pattern, valid, n, torch.device("cpu"), "tiles")
    out, _ = attend(q, k, v, mask, scaling=16**-0.5, attention_fn=fn)
    want = attend(
        q.double(), k.double(), v.double(), AttentionMask("eager", keep=keep), scaling=16**-0.5, attention_fn=fn
    )[0]
    assert not torch.isnan(out).any()
    assert (out.double() - want).abs().max() < 5e-5  # float32 on scores up to ~50
    assert out[2].abs().max() == 0  # fully padded sequence: zeros


def test_tiles_kernel_runs_a_per_head_learned_mask_and_its_gradients_equal_eager():
    from hf_sparse.patterns import bind_learned

    n, heads = 260, 3
    g = torch.Generator().manual_seed(4)
    learned = torch.rand(heads, 300, 300, generator=g) < 0.05
    pattern = bind_learned(parse("learned+window:2"), learned)
    q, k, v = (torch.randn(2, heads, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, 200:] = False
    grads = {}
    for backend in ("tiles", "eager"):
        for fn in ("softmax", "entmax15"):
            out, _ = attend(
                q, k, v, build_mask(pattern, valid, n, torch.device("cpu"), backend), scaling=0.3, attention_fn=fn
            )
            grads[backend, fn] = (out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v)))
    for fn in ("softmax", "entmax15"):
        for got, want in zip(grads["tiles", fn], grads["eager", fn]):
            assert (got - want).abs().max() < 1e-10


@pytest.mark.parametrize("spec", ["random:3", "bigbird:2,1,2", "random:2,5&window:6"])
def test_random_keys_are_the_same_for_a_sentence_however_its_batch_is_padded(spec):
    """A query's random keys are drawn among its own sequence's tokens, per (seed, position): the same sentence
    gives the same output padded to 12 or to 30 tokens, or alone."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    outs, keeps = [], []
    for padded in (12, 30):
        pad = padded - 12
        qp, kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        valid = torch.arange(padded)[None] < 12
        mask = build_mask(parse(spec), valid, padded, torch.device("cpu"), "eager")
        outs.append(attend(qp, kp, vp, mask, scaling=0.3)[0][:, :12])
        keep = mask.keep[0, 0, :12, :12]
        keeps.append(keep)
        assert not mask.keep[0, 0, :12, 12:].any()  # never a padding key
    assert torch.equal(keeps[0], keeps[1])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)  # (was 0.04 apart when the draw followed the padding)
    if spec == "random:3":
        assert (keep.sum(-1) == 3).all()  # exactly R keys per query, among the real ones


def test_random_patterns_with_padding_are_refused_on_block_sparse_kernels():
    with pytest.raises(ValueError, match="draws its random keys among each sequence's own tokens"):
        _choose("tiles", pattern=parse("bigbird:64,1,3"), per_row=True)
    assert _choose("auto", pattern=parse("bigbird:64,1,3"), per_row=True) == "sdpa"
