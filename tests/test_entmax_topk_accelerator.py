"""hf_sparse.entmax_topk under its accelerator policy (forced on CPU tensors): host reads and launches per call.

On CUDA a host read of device data (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, ``unique``, boolean-mask
indexing) stalls the queue, and every dispatched op is a kernel launch; the CPU runs the same aten ops, so
counting them here under the accelerator policy counts the syncs and launches a GPU call would make. The results
must stay those of the ``entmax`` package (outputs, gradients, masks, retries).
"""

import collections
import warnings

import entmax
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sparse import entmax_topk
from hf_sparse.entmax_topk import entmax15, entmax_alpha, sparsemax
from test_entmax_topk import grad_of, masked_reference

FUNCTIONS = {
    "entmax15": (entmax15, lambda t: entmax.entmax15(t, dim=-1)),
    "sparsemax": (sparsemax, lambda t: entmax.sparsemax(t, dim=-1)),
    "alpha": (lambda t, **kw: entmax_alpha(t, 1.3, **kw), lambda t: entmax.entmax_bisect(t, 1.3, dim=-1)),
}
HOST_READS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select"}


@pytest.fixture
def accelerator(monkeypatch):
    """Every tensor treated as on an accelerator with 16 GiB (one chunk for everything these tests build)."""
    monkeypatch.setattr(entmax_topk, "_device_policy", lambda device: entmax_topk._accelerator_policy(2**34))


class Counter(TorchDispatchMode):
    """Dispatched aten ops and the host reads among them (a bool index counts; ``.tolist()`` is counted by the
    ``counting`` fixture, as it dispatches nothing on a CPU tensor)."""

    def __init__(self, reads):
        super().__init__()
        self.ops = collections.Counter()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if name in HOST_READS or name.startswith("repeat_interleave") or bool_index:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counting(monkeypatch):
    reads = collections.Counter()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        reads["tolist"] += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def count(fn):
        reads.clear()
        with Counter(reads) as c:
            fn()
        return sum(c.ops.values()), sum(reads.values())

    return count


def scores(shape, scale, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def measure(count, ours, batch, length, k):
    """(ops, host reads) of a forward with ``k``, its backward, and a forward with k=None, on (batch, 4, L, L)
    scores whose supports are at most 3 (three columns far above the rest), so that every row passes the
    certificate with the given k and with the sampled one: the common path."""
    x = scores((batch, 4, length, length), 1.0, seed=length + batch, dtype=torch.float32)
    x[..., [5, length // 2, length - 1]] += 20
    x.requires_grad_(True)
    out = []
    found = {"k": count(lambda: out.append(ours(x, k=k)))}
    assert (out[0] > 0).sum(-1).max() <= 3
    found["backward"] = count(lambda: out[0].backward(torch.ones_like(out[0])))
    found["None"] = count(lambda: ours(x.detach()))
    return found


@pytest.mark.parametrize(("name", "length"), [(name, 256) for name in FUNCTIONS] + [("entmax15", 1024)])
def test_one_host_read_and_as_many_launches_for_eight_times_the_rows(accelerator, counting, name, length):
    ours = FUNCTIONS[name][0]
    one, eight = (measure(counting, ours, batch, length, k=8) for batch in (1, 8))
    for found in (one, eight):
        assert found["k"][1] == 1, found  # the certificate check only
        assert found["None"][1] == 2, found  # ... and the sampled support sizes
        assert found["backward"][1] == 0, found
    for call in ("k", "None", "backward"):
        assert one[call][0] == eight[call][0], (one, eight)  # launches do not grow with the rows
    assert one["k"][0] <= (600 if name == "alpha" else 100), one  # the bisection: 50 steps of ~8 ops


def test_a_tensor_alpha_is_checked_in_the_same_host_read(accelerator, counting):
    x = scores((2, 4, 64, 64), 1.0, seed=13)
    x[..., [5, 40]] += 20  # supports of at most 2: every row passes with k = 8
    alpha = torch.tensor([1.2, 1.5, 1.7, 2.0], dtype=torch.float64).view(4, 1, 1)
    out = []
    assert counting(lambda: out.append(entmax_alpha(x, alpha, k=8)))[1] == 1
    assert torch.allclose(out[0], entmax.entmax_bisect(x, alpha.expand(2, 4, 64, 1), dim=-1), rtol=0, atol=1e-10)
    for bad in (1.0, 0.5, float("nan"), float("inf")):
        wrong = alpha.clone()
        wrong[2] = bad
        for k in (8, 64, None):  # the certificate's read, no certificate (k = L), the sample first
            with pytest.raises(ValueError, match="alpha must be finite and > 1"):
                entmax_alpha(x, wrong, k=k)
        with pytest.raises(ValueError, match="alpha must be finite and > 1"):
            entmax_alpha(x[..., :0], wrong)
        with pytest.raises(ValueError, match="alpha must be finite and > 1"):
            entmax_topk.estimate_k(x, wrong)


def test_the_cpu_keeps_its_chunks_and_an_accelerator_takes_one(counting):
    rows = torch.empty(8 * 4 * 1024, 1024)  # (8, 4, 1024, 1024) scores, never touched
    cpu = entmax_topk._device_policy(torch.device("cpu"))
    assert len(entmax_topk._chunks(rows, None, cpu)) == 4  # CHUNK_ELEMENTS
    keep = torch.ones(1, dtype=torch.bool)
    assert len(entmax_topk._chunks(rows, keep, entmax_topk._accelerator_policy(2**34))) == 1
    assert len(entmax_topk._chunks(rows, keep, entmax_topk._accelerator_policy(2**30))) == 4  # 2^30 / 64 / 2
    x = scores((8, 4, 64, 64), 4.0, seed=3, dtype=torch.float32)
    assert counting(lambda: entmax15(x, k=16))[1] > 1  # the CPU reads per chunk and per solver choice


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_results_equal_the_package_with_masks_and_retries(accelerator, name, dtype):
    ours, ref = FUNCTIONS[name]
    b, h, n = 3, 2, 37
    x = scores((b, h, n, n), 1.5, seed=5, dtype=dtype)
    x[0, 0, 0] = 0.7  # support = the whole row
    x[0, 0, 1, 5] = 100.0  # support 1
    x[0, 1, 2] = torch.linspace(0, 1, n, dtype=dtype)  # support in the middle of the sorted order
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 20:] = False
    valid[2] = False  # a fully padded sequence: every row masked
    keep = causal & valid[:, None, None, :]
    want = masked_reference(x, keep, ref)
    dy = scores((b, h, n, n), 1.0, seed=6, dtype=dtype)
    g_want = grad_of(lambda t: masked_reference(t, keep, ref), x, dy)
    atol, gatol = (1e-10, 1e-8) if dtype == torch.float64 else (1e-6, 1e-5)
    for k in (None, 1, 2, 5):  # k = 1, 2: nearly every row is retried, some twice, some sorted whole
        p = ours(x, keep=keep, k=k)
        assert (p - want).abs().max() <= atol
        assert (p[~keep.expand_as(p)] == 0).all() and torch.isfinite(p).all()
        g = grad_of(lambda t, k=k: ours(t, keep=keep, k=k), x, dy)
        assert torch.isfinite(g).all() and (g[~keep.expand_as(g)] == 0).all()
        assert (g - g_want).abs().max() <= gatol


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_retries_across_many_chunks(accelerator, monkeypatch, name):
    """A memory budget of a few rows per chunk: failed rows of every chunk are zeroed in their chunk's slots and
    solved again in one retry."""
    monkeypatch.setattr(entmax_topk, "_device_policy", lambda device: entmax_topk._accelerator_policy(64 * 300))
    ours, ref = FUNCTIONS[name]
    x = scores((2, 3, 10, 300), 1.0, seed=7)
    assert len(entmax_topk._chunks(x.view(-1, 300), None, entmax_topk._device_policy(x.device))) == 60
    dy = scores((2, 3, 10, 300), 1.0, seed=8)
    want, g_want = ref(x), grad_of(ref, x, dy)
    for k in (1, 8):
        assert torch.allclose(ours(x, k=k), want, rtol=0, atol=1e-10)
        assert torch.allclose(grad_of(lambda t, k=k: ours(t, k=k), x, dy), g_want, rtol=0, atol=1e-8)


def test_nan_rows_and_low_precision(accelerator):
    x = scores((4, 300), 1.0, seed=9)
    x[1, 17] = float("nan")
    for k in (None, 1):
        p = entmax15(x, k=k)
        assert torch.isnan(p[1]).any()
        assert torch.allclose(p[[0, 2, 3]], entmax.entmax15(x[[0, 2, 3]], dim=-1), rtol=0, atol=1e-12)
    x = scores((2, 3, 700), 2.0, seed=10, dtype=torch.bfloat16)
    keep = torch.rand(2, 1, 700, generator=torch.Generator().manual_seed(11)) > 0.2
    p = entmax15(x, keep=keep)
    want = entmax.entmax15(x.float().masked_fill(~keep, float("-inf")).nan_to_num(neginf=-1e4), dim=-1)
    assert p.dtype == torch.bfloat16 and (p.float() - want).abs().max() <= torch.finfo(torch.bfloat16).eps


def cuda_syncs(fn) -> int:
    """Synchronising CUDA calls made by ``fn()``, as torch's sync debug mode reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_one_synchronisation_per_call_with_k_two_without():
    x = scores((2, 4, 512, 512), 1.0, seed=12, dtype=torch.float32)
    x[..., [5, 200, 511]] += 20  # supports of at most 3: every row passes the certificate
    x = x.cuda()
    entmax15(x, k=8)  # warm up
    out = []
    assert cuda_syncs(lambda: out.append(entmax15(x, k=8))) == 1
    assert cuda_syncs(lambda: entmax15(x)) == 2
    assert cuda_syncs(lambda: entmax_alpha(x, 1.3, k=8)) == 1
    assert torch.allclose(out[0].cpu(), entmax.entmax15(x.cpu(), dim=-1), rtol=0, atol=1e-6)
