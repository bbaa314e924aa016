"""The C++ ``cpu`` backend and the chunked PyTorch fallback against the float64 reference.

Values and gradients for random upstream gradients on logp and KL at once, odd shapes (N, D, V not
multiples of any tile), 25% ignored tokens, fp32 and bf16, both KL directions, no reference, a
reference of another width, large logits, all tokens ignored, N == 0; the fallback path of
``backend="auto"``; out-of-range labels (every backend raises the same ValueError); double backward
(the fused backends refuse create_graph=True, "torch" supports it); and a memory check that no
N x V tensor is allocated, measured single-threaded so that it is complete and host-independent.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from synthunlearn.ops.memory_probe import peak_cpu_allocated_bytes

os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "torch_extensions"))

from synthunlearn.ops import cpu_backend, linear_logprob_kl  # noqa: E402
from synthunlearn.ops.chunked_fallback import linear_logprob_kl_chunked  # noqa: E402
from tests.ops.float64_reference import reference_logprob_kl  # noqa: E402

# Error bound: |out - ref| <= rtol * max|ref| + atol, per tensor.  fp32 runs at ~1e-6 in practice;
# bf16 inputs are exact in the reference (it upcasts the stored values), so only the bf16 rounding
# of the returned gradients and the fp32 arithmetic remain.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-3)}
# |z| ~ 1e3: fp32 logits carry ~1e-4 absolute error, which log p and the KL inherit.
LARGE_TOL = {torch.float32: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}

N, D, D_REF, V = 37, 48, 40, 1031


def _cpu_small_tiles(*args, **kwargs):
    # Small tiles: several token blocks and vocabulary tiles, ragged at both ends.
    return cpu_backend.linear_logprob_kl_cpu(*args, block_n=16, block_v=128, **kwargs)


def _cpu_default_tiles(*args, **kwargs):
    return cpu_backend.linear_logprob_kl_cpu(*args, **kwargs)


def _chunked(*args, **kwargs):
    return linear_logprob_kl_chunked(*args, chunk_n=16, chunk_v=300, **kwargs)


IMPLS = {"cpu": _cpu_small_tiles, "cpu_default_tiles": _cpu_default_tiles, "chunked": _chunked}


def _make_case(seed, dtype, ref, n=N, scale=1.0, ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, D, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    ref_hidden = ref_weight = None
    if ref is not None:
        d_ref = D if ref == "same" else D_REF
        ref_hidden = (torch.randn(n, d_ref, generator=g) * scale).to(dtype)
        ref_weight = (torch.randn(V, d_ref, generator=g) / d_ref ** 0.5).to(dtype)
    g_logp = torch.randn(n, generator=g)
    g_kl = torch.randn(n, generator=g)
    return hidden, weight, labels, ref_hidden, ref_weight, g_logp, g_kl


def _run(fn, case, direction, use_g_logp=True, use_g_kl=True):
    hidden, weight, labels, ref_hidden, ref_weight, g_logp, g_kl = case
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, kl, ref_logp = fn(h, w, labels, ref_hidden, ref_weight, kl_direction=direction)
    loss = torch.zeros(())
    if use_g_logp:
        loss = loss + (logp * g_logp).sum()
    if use_g_kl and kl is not None:
        loss = loss + (kl * g_kl).sum()
    if loss.requires_grad:
        loss.backward()
    grad_h = h.grad if h.grad is not None else torch.zeros_like(h)
    grad_w = w.grad if w.grad is not None else torch.zeros_like(w)
    return logp, kl, ref_logp, grad_h, grad_w


def _assert_close(name, out, ref, rtol, atol):
    assert out.dtype in (torch.float32, torch.bfloat16, torch.float16), name
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = rtol * (ref.abs().max().item() if ref.numel() else 0.0) + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _check(fn, case, direction, tol, use_g_logp=True, use_g_kl=True):
    hidden, weight, labels, ref_hidden, ref_weight, g_logp, g_kl = case
    logp, kl, ref_logp, grad_h, grad_w = _run(fn, case, direction, use_g_logp, use_g_kl)
    ref = reference_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, direction, -100,
                               g_logp if use_g_logp else None, g_kl if use_g_kl else None)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    _assert_close("logp", logp, ref.logp, **tol)
    if ref_hidden is None:
        assert kl is None and ref_logp is None
    else:
        assert kl.dtype == torch.float32 and ref_logp.dtype == torch.float32
        assert not ref_logp.requires_grad
        _assert_close("kl", kl, ref.kl, **tol)
        _assert_close("ref_logp", ref_logp, ref.ref_logp, **tol)
    assert grad_h.dtype == hidden.dtype and grad_w.dtype == weight.dtype
    _assert_close("grad_hidden", grad_h, ref.grad_hidden, **tol)
    _assert_close("grad_weight", grad_w, ref.grad_weight, **tol)
    ignored = labels == -100
    assert (logp[ignored] == 0).all()
    if kl is not None:
        assert (kl[ignored] == 0).all() and (ref_logp[ignored] == 0).all()
    return grad_h, grad_w


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("ref", [None, "same", "other_width"])
def test_values_and_grads(impl, dtype, direction, ref):
    case = _make_case(1, dtype, ref)
    _check(IMPLS[impl], case, direction, TOL[dtype])


@pytest.mark.parametrize("impl", ["cpu", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_large_logits(impl, dtype, direction):
    # hidden ~ 150 * N(0, 1), weight rows of norm ~1 over D=48: |z| up to ~1e3.
    case = _make_case(2, dtype, "other_width", scale=150.0)
    hidden, weight = case[0], case[1]
    assert (hidden.float() @ weight.float().T).abs().max() > 500
    _check(IMPLS[impl], case, direction, LARGE_TOL[dtype])


@pytest.mark.parametrize("impl", ["cpu", "chunked"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("which", ["logp_only", "kl_only"])
def test_single_upstream(impl, direction, which):
    # Only one output carries a gradient (autograd passes None for the other).
    case = _make_case(3, torch.float32, "other_width")
    _check(IMPLS[impl], case, direction, TOL[torch.float32],
           use_g_logp=which == "logp_only", use_g_kl=which == "kl_only")


@pytest.mark.parametrize("impl", ["cpu", "chunked"])
@pytest.mark.parametrize("ref", [None, "other_width"])
def test_all_ignored(impl, ref):
    case = _make_case(4, torch.float32, ref, ignored=1.1)
    assert (case[2] == -100).all()
    logp, kl, ref_logp, grad_h, grad_w = _run(IMPLS[impl], case, "reverse")
    for t in (logp, grad_h, grad_w) + ((kl, ref_logp) if ref else ()):
        assert torch.isfinite(t).all() and (t == 0).all()


@pytest.mark.parametrize("impl", ["cpu", "chunked"])
def test_empty_batch(impl):
    case = _make_case(5, torch.float32, "other_width", n=0)
    logp, kl, ref_logp, grad_h, grad_w = _run(IMPLS[impl], case, "forward")
    assert logp.shape == kl.shape == ref_logp.shape == (0,)
    assert grad_h.shape == (0, D) and (grad_w == 0).all()


def test_fp16_inputs():
    case = _make_case(6, torch.float16, "same")
    _check(_cpu_small_tiles, case, "forward", TOL[torch.bfloat16])


def test_only_weight_or_only_hidden_requires_grad():
    hidden, weight, labels, ref_hidden, ref_weight, g_logp, g_kl = _make_case(7, torch.float32, "same")
    ref = reference_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, "forward", -100, g_logp, g_kl)
    for grad_hidden in (True, False):
        h = hidden.clone().requires_grad_(grad_hidden)
        w = weight.clone().requires_grad_(not grad_hidden)
        logp, kl, _ = cpu_backend.linear_logprob_kl_cpu(h, w, labels, ref_hidden, ref_weight)
        ((logp * g_logp).sum() + (kl * g_kl).sum()).backward()
        leaf, expected = (h, ref.grad_hidden) if grad_hidden else (w, ref.grad_weight)
        _assert_close("grad", leaf.grad, expected, **TOL[torch.float32])


def test_tied_embedding_weight():
    # The head is the input embedding: autograd must add the two contributions.
    hidden_ids = torch.randint(0, V, (N,))
    emb = torch.nn.Embedding(V, D)
    labels = torch.randint(0, V, (N,))
    grads = []
    for backend in ("cpu", "torch"):
        emb.weight.grad = None
        h = emb(hidden_ids)
        logp = linear_logprob_kl(h, emb.weight, labels, backend=backend).logp
        logp.sum().backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_deterministic():
    case = _make_case(8, torch.float32, "other_width")
    first = _run(_cpu_small_tiles, case, "reverse")
    second = _run(_cpu_small_tiles, case, "reverse")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_public_dispatch_and_invalid_label():
    case = _make_case(9, torch.float32, "same")
    hidden, weight, labels, ref_hidden, ref_weight = case[:5]
    out = linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, backend="cpu")
    ref = linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, backend="torch")
    torch.testing.assert_close(out.kl, ref.kl, rtol=1e-4, atol=1e-5)
    bad = labels.clone()
    bad[0] = V
    # The shared check of linear_logprob_kl (a ValueError) runs before the kernel's own TORCH_CHECK.
    with pytest.raises(ValueError, match="outside"):
        linear_logprob_kl(hidden, weight, bad, backend="cpu")
    with pytest.raises(RuntimeError, match="outside"):  # the kernel's check, for direct calls
        cpu_backend.linear_logprob_kl_cpu(hidden, weight, bad)


def _simulate_failed_build(monkeypatch):
    def broken():
        raise cpu_backend.CpuBackendUnavailable("simulated: no C++ compiler")

    monkeypatch.setattr(cpu_backend, "load_extension", broken)
    monkeypatch.setattr(cpu_backend, "_warned", True)  # no fallback warning in these tests


def _labels_case(seed=14, n=6, d=4, vocab=9):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g)
    ref_hidden, ref_weight = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[2] = -100
    return hidden, weight, labels, ref_hidden, ref_weight


# "auto_fallback" is backend="auto" with the C++ build failing: the chunked fallback, which used
# to accept these labels and return logp = -logsumexp(z) for them.
LABEL_BACKENDS = ["torch", "cpu", "auto", "auto_fallback", "chunked_direct"]


def _call_with_labels(backend, monkeypatch, hidden, weight, labels, ref_hidden, ref_weight, **kw):
    if backend == "chunked_direct":
        return linear_logprob_kl_chunked(hidden, weight, labels, ref_hidden, ref_weight, **kw)
    if backend == "auto_fallback":
        _simulate_failed_build(monkeypatch)
        backend = "auto"
    return linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, backend=backend, **kw)


@pytest.mark.parametrize("backend", LABEL_BACKENDS)
@pytest.mark.parametrize("bad_label", [9, 1000, -1, -101], ids=["V", "far_above", "minus_1", "below_ignore"])
def test_out_of_range_label_raises_for_every_backend(backend, bad_label, monkeypatch):
    hidden, weight, labels, ref_hidden, ref_weight = _labels_case()
    labels[4] = bad_label
    with pytest.raises(ValueError, match=rf"label {bad_label} at token 4 is outside \[0, 9\)"):
        _call_with_labels(backend, monkeypatch, hidden, weight, labels, ref_hidden, ref_weight)


@pytest.mark.parametrize("backend", LABEL_BACKENDS)
def test_ignore_index_is_exempt_from_the_label_range(backend, monkeypatch):
    # -1 is valid when it is the ignore_index (and then -100 is out of range); an ignore_index
    # inside [0, V) is an ordinary class index that is also ignored.
    hidden, weight, labels, ref_hidden, ref_weight = _labels_case()
    labels[2] = -1
    out = _call_with_labels(backend, monkeypatch, hidden, weight, labels, ref_hidden, ref_weight,
                            ignore_index=-1)
    expected = reference_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, "forward", -1)
    torch.testing.assert_close(out[0].double(), expected.logp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1].double(), expected.kl, rtol=1e-4, atol=1e-5)
    labels[3] = -100
    with pytest.raises(ValueError, match="label -100 at token 3 is outside"):
        _call_with_labels(backend, monkeypatch, hidden, weight, labels, ref_hidden, ref_weight,
                          ignore_index=-1)
    labels[2], labels[3] = 0, 5
    out = _call_with_labels(backend, monkeypatch, hidden, weight, labels, ref_hidden, ref_weight,
                            ignore_index=5)
    expected = reference_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, "forward", 5)
    torch.testing.assert_close(out[0].double(), expected.logp, rtol=1e-4, atol=1e-5)
    assert out[0][3] == 0


@pytest.mark.parametrize("backend", ["cpu", "auto_fallback", "chunked_direct"])
@pytest.mark.parametrize("output", ["logp", "kl"])
def test_double_backward_raises(backend, output, monkeypatch):
    # A gradient penalty through the op (create_graph=True) needs second derivatives, which the
    # fused backends do not provide. torch's once_differentiable let this through silently when
    # the upstream gradient was a constant (here: the ones of .sum()), dropping the second-order
    # terms: grad_w came out 4.73 instead of 14.82 on the reviewer's case.
    hidden, weight, labels, ref_hidden, ref_weight = _labels_case()
    h = hidden.clone().requires_grad_(True)
    out = _call_with_labels(backend, monkeypatch, h, weight.clone().requires_grad_(True), labels,
                            ref_hidden, ref_weight)
    value = out[0] if output == "logp" else out[1]
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(value.sum(), h, create_graph=True)
    # First-order gradients are unaffected.
    (grad,) = torch.autograd.grad(value.sum(), h)
    assert torch.isfinite(grad).all() and not grad.requires_grad


def test_torch_backend_supports_double_backward():
    # Gradient penalty: L = sum(logp + kl) + |dL0/dh|^2, differentiated w.r.t. the head; the
    # float64 composition gives the expected second-order result.
    hidden, weight, labels, ref_hidden, ref_weight = _labels_case()
    grads = []
    for dtype, backend in ((torch.float32, "torch"), (torch.float64, None)):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        if backend is None:
            from synthunlearn.ops.torch_reference import linear_logprob_kl_torch
            logp, kl, _ = linear_logprob_kl_torch(h, w, labels, ref_hidden.double(), ref_weight.double(),
                                                  compute_dtype=torch.float64)
        else:
            logp, kl, _ = linear_logprob_kl(h, w, labels, ref_hidden, ref_weight, backend=backend)
        (gh,) = torch.autograd.grad((logp + kl).sum(), h, create_graph=True)
        (gw,) = torch.autograd.grad((logp + kl).sum() + gh.pow(2).sum(), w)
        grads.append(gw)
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-4, atol=1e-5)


def test_auto_falls_back_with_one_warning_when_build_fails(monkeypatch):
    def broken():
        raise cpu_backend.CpuBackendUnavailable("simulated: no C++ compiler")

    monkeypatch.setattr(cpu_backend, "load_extension", broken)
    monkeypatch.setattr(cpu_backend, "_warned", False)
    case = _make_case(10, torch.float32, "other_width")
    hidden, weight, labels, ref_hidden, ref_weight = case[:5]
    with pytest.warns(RuntimeWarning, match="simulated: no C\\+\\+ compiler"):
        out = linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, backend="auto")
    ref = linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, backend="torch")
    torch.testing.assert_close(out.kl, ref.kl, rtol=1e-4, atol=1e-5)
    with pytest.raises(cpu_backend.CpuBackendUnavailable, match="simulated"):
        linear_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, backend="cpu")


def _memory_case(n, d, vocab, seed=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_(True)
    weight = torch.randn(vocab, d, generator=g).requires_grad_(True)
    ref_hidden, ref_weight = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, labels, ref_hidden, ref_weight


def _fwd_bwd(fn, case):
    def step():
        logp, kl, _ = fn(*case, kl_direction="forward")
        (logp.sum() + kl.sum()).backward()
    return step


# N x V fp32 is 128 MiB for the memory tests' shape; the gradients are 2.1 MiB and the tiles a few MiB.
MEM_N, MEM_D, MEM_V = 1024, 16, 32768
# Allowed extra memory, measured on ONE thread: fp32 gradients (+ the one dW accumulator of the one
# slot, + a cast copy), O(N) statistics and fixed-size tiles (the fallback keeps several
# chunk_n x chunk_v fp32 temporaries per tile).  A constant: it must not grow with the host's
# thread count (it used to be grads * (2 + threads) + 16 MiB, above the N x V / 4 ceiling from
# 6 threads on, so the test failed on such hosts whatever the kernel did).
MEM_BUDGET = (MEM_N * MEM_D + MEM_V * MEM_D) * 4 * 3 + 16 * 2 ** 20


def _peak_bytes(step):
    """Peak extra bytes of step(), warm-up included, with a complete count.

    The memory probe sees only allocations on the calling thread; the C++ kernel allocates its
    tiles inside at::parallel_for, i.e. on other threads when torch runs several.  On one thread
    parallel_for runs inline, so everything the kernel allocates is counted, and the result (and
    the budget) is the same on any host.  Memory that scales with threads by design (one dW
    accumulator and one tile set per thread) is the one-thread amount times the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step()  # warm-up (and the build, if any)
    finally:
        torch.set_num_threads(threads)
    return peak_cpu_allocated_bytes(step, num_threads=1)


@pytest.mark.parametrize("host_threads", [None, 8], ids=["host_default", "host_8_threads"])
@pytest.mark.parametrize("impl", ["cpu", "chunked"])
def test_no_n_by_v_allocation(impl, host_threads):
    threads = torch.get_num_threads()
    if host_threads is not None:
        torch.set_num_threads(host_threads)  # as on a host where torch starts 8 threads
    try:
        case = _memory_case(MEM_N, MEM_D, MEM_V)
        if impl == "chunked":
            fn = lambda *a, **k: linear_logprob_kl_chunked(*a, chunk_n=128, chunk_v=2048, **k)  # noqa: E731
        else:
            fn = cpu_backend.linear_logprob_kl_cpu
        peak = _peak_bytes(_fwd_bwd(fn, case))
    finally:
        torch.set_num_threads(threads)
    n_by_v = MEM_N * MEM_V * 4
    assert peak < MEM_BUDGET < n_by_v / 4, (peak, MEM_BUDGET, n_by_v)


def test_memory_measurement_counts_every_threads_tiles():
    # The measurement of test_no_n_by_v_allocation must see every byte the kernel holds, whatever
    # the host's thread count: here torch has 2 threads, and a block_v = V tile (block_n x V fp32,
    # 32 MiB, allocated inside at::parallel_for once per thread that runs) stands in for a
    # V-proportional allocation.  Measured with the host's threads the probe saw one tile (the
    # calling thread's) out of two.
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(MEM_N, MEM_D, generator=g), torch.randn(MEM_V, MEM_D, generator=g)
    labels = torch.randint(0, MEM_V, (MEM_N,), generator=g)
    used_threads = []

    def step():
        used_threads.append(torch.get_num_threads())
        cpu_backend.linear_logprob_kl_cpu(hidden, weight, labels, block_n=256, block_v=MEM_V)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        peak = _peak_bytes(step)
    finally:
        torch.set_num_threads(threads)
    t = used_threads[-1]
    # The kernel's effective_block_n and slot count for t threads (csrc/linear_logprob_kl.cpp).
    block_n = min(256, (-(-MEM_N // t) + 7) // 8 * 8)
    slots = min(t, -(-MEM_N // block_n))
    tiles = slots * block_n * MEM_V * 4
    assert peak >= tiles, (peak, tiles, t)
    assert peak > MEM_BUDGET  # and the memory test would flag such a tile


def test_memory_probe_sees_n_by_v_allocations():
    # The probe is meaningful: the materialising oracle's peak exceeds N x V fp32.
    from synthunlearn.ops.torch_reference import linear_logprob_kl_torch

    n, vocab = 256, 8192
    peak = _peak_bytes(_fwd_bwd(linear_logprob_kl_torch, _memory_case(n, 16, vocab)))
    assert peak > 2 * n * vocab * 4
