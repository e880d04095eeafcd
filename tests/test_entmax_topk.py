"""hf_sparse.entmax_topk against the entmax package: same outputs and gradients, masks, low precision."""

import entmax
import pytest
import torch

from hf_sparse import entmax_topk
from hf_sparse.entmax_topk import _topk, entmax15, entmax_alpha, estimate_k, sparsemax

LENGTHS = [1, 7, 128, 1000]
SCALES = [0.1, 1.0, 10.0, 100.0]


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % 2**31)


def scores(shape, scale, seed, dtype=torch.float64):
    return (torch.randn(shape, generator=generator(*shape, scale, seed), dtype=torch.float64) * scale).to(dtype)


def with_ties(x: torch.Tensor) -> torch.Tensor:
    """Row 0 constant (support = whole row), row 1 two equal maxima far above the rest, row 2 one huge maximum
    (support 1), row 3 all maxima equal in pairs (every value twice)."""
    x = x.clone()
    length = x.shape[-1]
    x[..., 0, :] = 0.7
    if length > 1:
        x[..., 1, :2] = x[..., 1, :].max() + 50
        x[..., 3, :] = x[..., 3, : (length + 1) // 2].repeat_interleave(2, dim=-1)[..., :length]
    x[..., 2, length // 2] = x[..., 2, :].max() + 100
    return x


def grad_of(fn, x, dy):
    x = x.detach().requires_grad_(True)
    (fn(x) * dy).sum().backward()
    return x.grad


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("scale", SCALES)
def test_entmax15_equals_package_float64_and_float32(length, scale):
    x = with_ties(scores((2, 6, length), scale, seed=0))
    want = entmax.entmax15(x, dim=-1)
    assert (want[..., 0, :] > 0).all() and ((want[..., 2, :] > 0).sum(-1) == 1).all()  # whole row; support 1
    got = entmax15(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert (got[want == 0] == 0).all()  # exact zeros where the package has them
    x32 = x.float()
    assert (entmax15(x32) - entmax.entmax15(x32, dim=-1)).abs().max() <= 1e-6
    dy = scores((2, 6, length), 1.0, seed=1)
    g_want = grad_of(lambda t: entmax.entmax15(t, dim=-1), x, dy)
    assert torch.allclose(grad_of(entmax15, x, dy), g_want, rtol=0, atol=1e-10)
    g32 = grad_of(entmax15, x32, dy.float())
    assert (g32 - grad_of(lambda t: entmax.entmax15(t, dim=-1), x32, dy.float())).abs().max() <= 1e-5


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("scale", SCALES)
def test_sparsemax_equals_package_float64_and_float32(length, scale):
    x = with_ties(scores((2, 6, length), scale, seed=30))
    want = entmax.sparsemax(x, dim=-1)
    got = sparsemax(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert (got[want == 0] == 0).all()
    x32 = x.float()
    assert (sparsemax(x32) - entmax.sparsemax(x32, dim=-1)).abs().max() <= 1e-6
    dy = scores((2, 6, length), 1.0, seed=31)
    g_want = grad_of(lambda t: entmax.sparsemax(t, dim=-1), x, dy)
    assert torch.allclose(grad_of(sparsemax, x, dy), g_want, rtol=0, atol=1e-10)
    for k in (1, 3):  # the retry path
        assert torch.allclose(sparsemax(x, k=k), want, rtol=0, atol=1e-12)
        assert torch.allclose(grad_of(lambda t, k=k: sparsemax(t, k=k), x, dy), g_want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_entmax_alpha_equals_entmax_bisect(length, scale, alpha):
    x = with_ties(scores((2, 6, length), scale, seed=2))
    want = entmax.entmax_bisect(x, alpha=alpha, dim=-1)
    got = entmax_alpha(x, alpha)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    x32 = x.float()
    assert (entmax_alpha(x32, alpha) - entmax.entmax_bisect(x32, alpha=alpha, dim=-1)).abs().max() <= 1e-6
    dy = scores((2, 6, length), 1.0, seed=3)
    g_want = grad_of(lambda t: entmax.entmax_bisect(t, alpha=alpha, dim=-1), x, dy)
    assert torch.allclose(grad_of(lambda t: entmax_alpha(t, alpha), x, dy), g_want, rtol=0, atol=1e-8)
    g32 = grad_of(lambda t: entmax_alpha(t, alpha), x32, dy.float())
    g32_want = grad_of(lambda t: entmax.entmax_bisect(t, alpha=alpha, dim=-1), x32, dy.float())
    assert (g32 - g32_want).abs().max() <= 1e-5


@pytest.mark.parametrize("k", [1, 2, 3, 8, 64])
def test_any_first_k_gives_the_same_exact_result(k):
    """A small k makes most rows fail the certificate and go through the retries (and full sorts)."""
    x = with_ties(scores((3, 5, 300), 0.5, seed=4))  # supports from 1 to the whole row
    x[0, 4] = torch.linspace(0, 1, 300, dtype=torch.float64)  # support in the middle of the sorted order
    want = entmax.entmax15(x, dim=-1)
    assert torch.allclose(entmax15(x, k=k), want, rtol=0, atol=1e-12)
    assert torch.allclose(entmax_alpha(x, 1.5, k=k), entmax.entmax_bisect(x, 1.5, dim=-1), rtol=0, atol=1e-10)
    dy = scores((3, 5, 300), 1.0, seed=5)
    g_want = grad_of(lambda t: entmax.entmax15(t, dim=-1), x, dy)
    assert torch.allclose(grad_of(lambda t: entmax15(t, k=k), x, dy), g_want, rtol=0, atol=1e-10)


def test_long_rows_and_lengths_that_are_not_multiples_of_the_group():
    for length in (2048, 2049, 4099):
        x = scores((2, 3, length), 2.0, seed=length)
        assert torch.allclose(entmax15(x), entmax.entmax15(x, dim=-1), rtol=0, atol=1e-12)
        for m in (1, 9, 33):
            values, idx = _topk(x.view(-1, length), m)
            assert torch.equal(values, torch.topk(x.view(-1, length), m).values)
            assert torch.equal(x.view(-1, length).gather(1, idx), values)


def test_gradcheck_float64():
    x = with_ties(scores((2, 4, 9), 1.0, seed=6)).requires_grad_(True)
    x.data[..., 0, :] += torch.arange(9, dtype=torch.float64) * 0.05  # gradcheck needs distinct values
    x.data[..., 3, :] = scores((2, 9), 1.0, seed=7)
    assert torch.autograd.gradcheck(lambda t: entmax15(t, k=2), (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda t: entmax_alpha(t, 1.3, k=2), (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, k=2), (x,), eps=1e-6, atol=1e-6)
    alpha = torch.tensor([[1.2], [1.7]], dtype=torch.float64).view(2, 1, 1).expand(2, 4, 1).clone()
    alpha.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, a: entmax_alpha(t, a, k=3), (x, alpha), eps=1e-6, atol=1e-5)


def test_alpha_tensor_gradient_matches_entmax_bisect():
    x = scores((3, 4, 50), 2.0, seed=8, dtype=torch.float32)
    alpha = (1.1 + torch.rand(3, 1, 1, generator=generator(9))).requires_grad_(True)
    dy = scores((3, 4, 50), 1.0, seed=10, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = entmax_alpha(xa, alpha, k=4)
    (ours * dy).sum().backward()
    ga, alpha_grad = xa.grad, alpha.grad.clone()
    alpha.grad = None
    want = entmax.entmax_bisect(xb, alpha.expand(3, 4, 1), dim=-1)
    (want * dy).sum().backward()
    assert (ours - want).abs().max() <= 1e-6
    assert (ga - xb.grad).abs().max() <= 1e-5
    assert torch.allclose(alpha_grad, alpha.grad, rtol=1e-4, atol=1e-5)


def test_other_dims():
    x = scores((5, 33, 4), 3.0, seed=11)
    for dim in (0, 1, -1):
        assert torch.allclose(entmax15(x, dim=dim), entmax.entmax15(x, dim=dim), rtol=0, atol=1e-12)
        assert torch.allclose(entmax_alpha(x, 1.7, dim=dim), entmax.entmax_bisect(x, 1.7, dim=dim), atol=1e-10)
    dy = scores((5, 33, 4), 1.0, seed=12)
    g_want = grad_of(lambda t: entmax.entmax15(t, dim=1), x, dy)
    assert torch.allclose(grad_of(lambda t: entmax15(t, dim=1), x, dy), g_want, atol=1e-10)


def masked_reference(x, keep, fn):
    """Row by row: the package on the kept entries only, zeros elsewhere (and for rows with nothing kept)."""
    out = torch.zeros_like(x)
    n = x.shape[-1]
    flat_x, flat_keep, flat_out = x.reshape(-1, n), keep.expand_as(x).reshape(-1, n), out.view(-1, n)
    for r in range(flat_x.shape[0]):
        if flat_keep[r].any():
            flat_out[r, flat_keep[r]] = fn(flat_x[r, flat_keep[r]])
    return out


@pytest.mark.parametrize("fn", ["entmax15", "sparsemax", "alpha"])
def test_masks_padding_causal_and_fully_masked_rows(fn):
    b, h, n = 3, 2, 40
    x = scores((b, h, n, n), 1.5, seed=13)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 25:] = False
    valid[2] = False  # a fully padded sequence: every row masked
    keep = causal[None, None] & valid[:, None, None, :]
    if fn == "entmax15":
        ours, ref = entmax15, lambda t: entmax.entmax15(t, dim=-1)
    elif fn == "sparsemax":
        ours, ref = sparsemax, lambda t: entmax.sparsemax(t, dim=-1)
    else:
        ours, ref = (lambda t, **kw: entmax_alpha(t, 1.3, **kw)), lambda t: entmax.entmax_bisect(t, 1.3, dim=-1)
    for k in (None, 2):
        x_ = x.clone().requires_grad_(True)
        p = ours(x_, keep=keep, k=k)
        want = masked_reference(x, keep, ref)
        assert torch.allclose(p, want, rtol=0, atol=1e-10)
        assert (p[~keep.expand_as(p)] == 0).all() and (p[2] == 0).all()
        (p * scores((b, h, n, n), 1.0, seed=14)).sum().backward()
        assert torch.isfinite(x_.grad).all()
        assert (x_.grad[~keep.expand_as(p)] == 0).all() and (x_.grad[2] == 0).all()
    # scores filled with finfo.min, as hf_sparse.attention.normalize does, give the package's result
    filled = x.masked_fill(~keep, torch.finfo(x.dtype).min)
    assert torch.allclose(ours(filled)[:2], ref(filled)[:2], rtol=0, atol=1e-10)
    # -inf scores are masked too; keep broadcasts (a (n,) padding vector)
    x2 = x[0, 0].clone()
    x2[:, :3] = float("-inf")
    assert torch.allclose(ours(x2), ours(x[0, 0], keep=torch.arange(n) >= 3), rtol=0, atol=0)
    everything_masked = torch.full((4, 6), float("-inf"), dtype=torch.float64, requires_grad=True)
    out = ours(everything_masked)
    out.sum().backward()
    assert (out == 0).all() and (everything_masked.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(dtype):
    x = scores((2, 3, 700), 2.0, seed=15, dtype=dtype)
    keep = torch.rand(2, 1, 700, generator=generator(16)) > 0.2
    for ours, ref in (
        (lambda t, **kw: entmax15(t, **kw), lambda t: entmax.entmax15(t, dim=-1)),
        (lambda t, **kw: sparsemax(t, **kw), lambda t: entmax.sparsemax(t, dim=-1)),
        (lambda t, **kw: entmax_alpha(t, 1.6, **kw), lambda t: entmax.entmax_bisect(t, 1.6, dim=-1)),
    ):
        x_ = x.clone().requires_grad_(True)
        p = ours(x_, keep=keep)
        assert p.dtype == dtype
        want = ref(x.float().masked_fill(~keep, float("-inf")).nan_to_num(neginf=-1e4))
        assert (p.float() - want).abs().max() <= torch.finfo(dtype).eps  # float32 result, rounded once
        p.float().pow(2).sum().backward()
        assert x_.grad.dtype == dtype and torch.isfinite(x_.grad.float()).all()


def test_rows_processed_in_many_chunks(monkeypatch):
    monkeypatch.setattr(entmax_topk, "CHUNK_ELEMENTS", 1000)  # chunks of 1-3 rows
    x = scores((2, 3, 10, 300), 1.0, seed=19)
    keep = torch.rand(2, 1, 10, 300, generator=generator(20)) > 0.3
    keep[0, 0, 3] = False
    full = keep.expand_as(x).any(-1)
    dy = scores((2, 3, 10, 300), 1.0, seed=21)
    filled = x.masked_fill(~keep, -1e300)
    for k in (None, 1):
        xa, xb = x.clone().requires_grad_(True), filled.clone().requires_grad_(True)
        alpha = (1.1 + torch.rand(2, 3, 10, 1, generator=generator(22), dtype=torch.float64)).requires_grad_(True)
        alpha_ref = alpha.detach().clone().requires_grad_(True)
        ours, want = entmax_alpha(xa, alpha, keep=keep, k=k), entmax.entmax_bisect(xb, alpha_ref, dim=-1)
        (ours * dy).sum().backward()
        (want * dy).sum().backward()
        assert torch.allclose(ours[full], want[full], rtol=0, atol=1e-10) and (ours[~full] == 0).all()
        assert torch.allclose(xa.grad[full], xb.grad[full], rtol=0, atol=1e-10)
        assert torch.allclose(alpha.grad[full], alpha_ref.grad[full], rtol=0, atol=1e-10)
        assert (alpha.grad[~full] == 0).all()
        assert torch.allclose(entmax15(x, keep=keep, k=k)[full], entmax.entmax15(filled, dim=-1)[full], atol=1e-12)


def test_nan_rows_stay_nan_and_other_rows_are_unaffected():
    x = scores((4, 300), 1.0, seed=18)
    x[1, 17] = float("nan")
    rows = [0, 2, 3]
    for k in (None, 1):
        p = entmax15(x, k=k)
        assert torch.isnan(p[1]).any()
        assert torch.allclose(p[rows], entmax.entmax15(x[rows], dim=-1), rtol=0, atol=1e-12)
        p = entmax_alpha(x, 1.4, k=k)
        assert torch.isnan(p[1]).any()
        assert torch.allclose(p[rows], entmax.entmax_bisect(x[rows], 1.4, dim=-1), rtol=0, atol=1e-10)


def test_estimate_k_and_errors():
    x = scores((4, 64, 512), 4.0, seed=17)
    support = (entmax.entmax15(x, dim=-1) > 0).sum(-1)
    k = estimate_k(x)
    assert k % 8 == 0 and 8 <= k <= 512 and k >= support.float().quantile(0.5)
    assert estimate_k(x[..., :5]) == 5
    with pytest.raises(ValueError):
        entmax_alpha(x, 1.0)
    with pytest.raises(ValueError):
        entmax15(x, keep=torch.ones(3, 512, dtype=torch.bool))
    with pytest.raises(TypeError):
        entmax15(x, keep=torch.ones(512))
    with pytest.raises(ValueError):
        entmax15(x, k=0)
    assert entmax15(torch.zeros(3, 0)).shape == (3, 0)
