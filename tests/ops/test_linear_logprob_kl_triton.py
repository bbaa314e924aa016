"""The Triton backend of linear_logprob_kl against float64 ground truth, under the Triton interpreter.

Shapes are odd on purpose (N=37, D=48, D_ref=40, V=1031): with the tiles below that is 2 token
blocks (the second partial), 5 vocab tiles (the last 7 wide) split over 2 programs, 2 D chunks
(the second partial). The interpreter runs every program in numpy, so tiles are large-ish and
each case is one forward + one backward.
"""

import os

# triton.jit reads TRITON_INTERPRET when the backend's kernels are decorated, i.e. at its import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from synthunlearn.ops import linear_logprob_kl  # noqa: E402
from synthunlearn.ops import triton_backend  # noqa: E402
from synthunlearn.ops.triton_backend import TileConfig, linear_logprob_kl_triton  # noqa: E402
from tests.ops import triton_checks  # noqa: E402
from tests.ops.float64_reference import reference_logprob_kl  # noqa: E402
from tests.ops.triton_checks import IGNORE, TOL, assert_close, random_inputs  # noqa: E402

if not triton_backend._interpreted() and torch.cuda.is_available():
    # On a GPU machine the compiled-kernel tests (test_linear_logprob_kl_cuda.py) may have imported
    # the backend first in this process; these interpreter tests then need a process of their own.
    pytest.skip("the Triton backend was compiled for the GPU in this process; run "
                "`python -m pytest tests/ops/test_linear_logprob_kl_triton.py` on its own", allow_module_level=True)
if not triton_backend._interpreted():
    raise RuntimeError("synthunlearn.ops.triton_backend was imported before TRITON_INTERPRET=1 was set; "
                       "run this module in its own pytest process or export TRITON_INTERPRET=1")

N, D, D_REF, V = 37, 48, 40, 1031
CFG = TileConfig(block_n=32, block_v=256, block_d=32, vocab_splits=2)


def make_inputs(dtype, **kw):
    """Random inputs of this module's shapes (see :func:`tests.ops.triton_checks.random_inputs`)."""
    return random_inputs(dtype, **{"n": N, "d": D, "d_ref": D_REF, "v": V, **kw})


def run_triton(*inputs, config=CFG, **kw):
    return triton_checks.run_triton(*inputs, config=config, **kw)


def check_against_float64(inputs, kl_direction="forward", tol=None, config=CFG, **kw):
    return triton_checks.check_against_float64(inputs, kl_direction, tol, config=config, **kw)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_float64_with_reference(dtype, kl_direction, deterministic):
    check_against_float64(make_inputs(dtype, seed=1), kl_direction, deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_float64_without_reference(dtype):
    check_against_float64(make_inputs(dtype, seed=2, with_ref=False))


def test_default_interpreter_tiles_and_fp16():
    # The default small tiles, one vocab split, fp16; V a prime so no tile is full at the end.
    check_against_float64(make_inputs(torch.float16, seed=3, v=211), "reverse", config=None)


def test_reference_of_other_dtype_and_width():
    check_against_float64(make_inputs(torch.float32, seed=4, d_ref=24, ref_dtype=torch.bfloat16), "forward")


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_large_logits(kl_direction):
    inputs = make_inputs(torch.float32, seed=5, logit_scale=1e3)
    hidden, weight = inputs[0], inputs[1]
    logits = hidden.detach() @ weight.detach().T
    assert logits.abs().max() > 1e3  # the online LSE must not overflow exp
    check_against_float64(inputs, kl_direction)


def test_upstream_on_one_output_only():
    hidden, weight, labels, rh, rw, g_l, g_k = make_inputs(torch.float32, seed=6)
    check_against_float64((hidden, weight, labels, rh, rw, None, g_k), "reverse")   # kl only
    check_against_float64((hidden, weight, labels, rh, rw, g_l, None), "forward")   # logp only: no ref recompute


def test_frozen_head_and_frozen_hidden():
    # Only one gradient wanted: the single deterministic kernel for it (dH over token blocks / dW over vocab blocks).
    hidden, weight, labels, rh, rw, g_l, g_k = make_inputs(torch.float32, seed=7)
    _, _, _, grad_h, grad_w = check_against_float64(
        (hidden, weight.detach(), labels, rh, rw, g_l, g_k), "forward", deterministic=False)
    assert grad_h is not None and grad_w is None
    _, _, _, grad_h, grad_w = check_against_float64(
        (hidden.detach(), weight, labels, rh, rw, g_l, g_k), "reverse", deterministic=False)
    assert grad_h is None and grad_w is not None


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_a_reference_that_requires_grad_stays_frozen(backend):
    # Every backend treats the reference as frozen: outputs that require grad only because the
    # reference does would promise a gradient that never comes.
    hidden, weight, labels, rh, rw, _, _ = make_inputs(torch.float32, seed=9)
    rh, rw = rh.detach().requires_grad_(True), rw.detach().requires_grad_(True)
    out = linear_logprob_kl(hidden.detach(), weight.detach(), labels, rh, rw, backend=backend)
    assert not (out.logp.requires_grad or out.kl.requires_grad or out.ref_logp.requires_grad)
    out = linear_logprob_kl(hidden, weight, labels, rh, rw, backend=backend)
    (out.logp.sum() + out.kl.sum()).backward()
    assert hidden.grad is not None and rh.grad is None and rw.grad is None


def test_tied_embedding_composes_with_autograd():
    # hidden = tanh(E[tokens]) and weight = E: the gradient reaches E along both paths.
    g = torch.Generator().manual_seed(8)
    emb = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_(True)
    tokens = torch.randint(0, V, (N,), generator=g)
    labels = torch.roll(tokens, -1)
    labels[-1] = IGNORE
    rh, rw = torch.randn(N, D_REF, generator=g), torch.randn(V, D_REF, generator=g) / D_REF ** 0.5
    g_l, g_k = torch.randn(N, generator=g), torch.randn(N, generator=g)

    logp, kl, _ = linear_logprob_kl_triton(torch.tanh(emb[tokens]), emb, labels, rh, rw, config=CFG)
    (grad,) = torch.autograd.grad((logp * g_l).sum() + (kl * g_k).sum(), emb)

    emb64 = emb.detach().double().requires_grad_(True)
    ref = reference_logprob_kl(torch.tanh(emb64[tokens]).detach(), emb64, labels, rh, rw, "forward", IGNORE, g_l, g_k)
    # chain rule through tanh and the gather, done by autograd in float64
    hidden64 = torch.tanh(emb64[tokens])
    (expected,) = torch.autograd.grad((hidden64 * ref.grad_hidden).sum(), emb64)
    assert_close(grad, expected + ref.grad_weight, TOL[torch.float32], "grad_embedding")


def test_all_tokens_ignored():
    inputs = make_inputs(torch.bfloat16, seed=9, ignored_fraction=1.0)
    logp, kl, ref_logp, grad_h, grad_w = run_triton(*inputs, kl_direction="reverse")
    for t in (logp, kl, ref_logp):
        assert torch.equal(t, torch.zeros(N))
    assert torch.equal(grad_h.float(), torch.zeros(N, D)) and torch.equal(grad_w.float(), torch.zeros(V, D))


def test_empty_batch():
    hidden, weight, labels, rh, rw, g_l, g_k = make_inputs(torch.float32, seed=10, n=0)
    logp, kl, ref_logp, grad_h, grad_w = run_triton(hidden, weight, labels, rh, rw, g_l, g_k)
    assert logp.shape == kl.shape == ref_logp.shape == (0,)
    assert grad_h.shape == (0, D) and torch.equal(grad_w, torch.zeros(V, D))


class _AtomicKernelLaunched(AssertionError):
    pass


class _ForbiddenKernel:
    """Stands in for _backward_atomic_kernel: any launch (kernel[grid](...)) fails the test."""

    def __getitem__(self, grid):
        raise _AtomicKernelLaunched("the atomic backward kernel was launched")


def test_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    # Under the interpreter programs run one after another, so the atomic kernel is reproducible
    # too and a bitwise comparison alone cannot fail on CPU. What makes the mode deterministic on a
    # GPU is that it never launches the atomic kernel (fp32 atomics add in arrival order): check
    # that, with the kernel replaced by one that raises, and keep the bitwise comparison.
    monkeypatch.setattr(triton_backend, "_backward_atomic_kernel", _ForbiddenKernel())
    inputs = make_inputs(torch.bfloat16, seed=11)
    with pytest.raises(_AtomicKernelLaunched):  # the stand-in is wired: the default mode hits it
        run_triton(*inputs, kl_direction="reverse", deterministic=False)
    for how in ("env", "torch_flag"):
        with monkeypatch.context() as m:
            if how == "env":
                m.setenv(triton_backend.DETERMINISTIC_ENV, "1")
            else:
                m.delenv(triton_backend.DETERMINISTIC_ENV, raising=False)
                m.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
            first = run_triton(*inputs, kl_direction="reverse")
            if how == "env":
                second = run_triton(*inputs, kl_direction="reverse")
                for a, b in zip(first, second):
                    assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_nan_upstream_gradient_propagates(deterministic):
    # A NaN loss must give NaN gradients, as in every other backend, not zeros. Tokens 32..36 form
    # the second token block (block_n = 32) and get NaN upstream gradients on both outputs; the
    # first block is finite. The block skip used max(|g_logp| + |g_kl|) > 0, false for NaN, so the
    # NaN block was skipped: its dH rows came back 0 and dW finite.
    hidden, weight, labels, rh, rw, g_l, g_k = make_inputs(torch.float32, seed=16)
    g_l, g_k = g_l.clone(), g_k.clone()
    g_l[32:], g_k[32:] = float("nan"), float("nan")
    labels[32] = IGNORE  # an ignored token's NaN upstream gradient is dropped (0), as in torch
    assert (labels[33:] != IGNORE).all()
    for kl_direction, upstream in (("forward", (g_l, g_k)), ("reverse", (None, g_k))):
        _, _, _, grad_h, grad_w = run_triton(hidden, weight, labels, rh, rw, *upstream,
                                             kl_direction=kl_direction, deterministic=deterministic)
        ref = reference_logprob_kl(hidden, weight, labels, rh, rw, kl_direction, IGNORE, *upstream)
        for name, got, want in (("grad_hidden", grad_h, ref.grad_hidden), ("grad_weight", grad_w, ref.grad_weight)):
            assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN pattern differs from torch"
        assert grad_h[33:].isnan().all() and grad_w.isnan().all()
        assert not grad_h[:33].isnan().any()
        assert_close(grad_h[:32], ref.grad_hidden[:32], TOL[torch.float32], "grad_hidden (finite block)")


def _offset_reference_inputs(dtype, seed, offset):
    """Policy inputs of make_inputs; the reference head is the policy head perturbed, plus one input
    column that adds c_i (|c_i| in [offset, 1.5 offset], either sign) to every reference logit of
    token i:  zq_i = (h_i + 0.1 eps_i) W^T + c_i.  The KL does not depend on c_i."""
    hidden, weight, labels, _, _, g_l, g_k = make_inputs(dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    sign = torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0)
    c = offset * sign * (1 + 0.5 * torch.rand(N, generator=g))
    rh = torch.cat([hidden.detach().float() + 0.1 * torch.randn(N, D, generator=g), c[:, None]], 1).to(dtype)
    rw = torch.cat([weight.detach().float(), torch.ones(V, 1)], 1).to(dtype)
    return hidden, weight, labels, rh, rw, g_l, g_k


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kl_precision_at_a_large_per_token_reference_offset(dtype, kl_direction):
    # KL is invariant to a per-token constant c added to one head's logits, so its error must be
    # small relative to the KL itself (3e-3 .. 8e-3 here), not to |c| = 1e3. Summing q (zq - z)
    # unshifted and adding LSE_p - LSE_q (each ~1e3, fp32 ulp 6e-5) gave relative errors of
    # 3.5e-2 .. 6.3e-2; with the shifted cross term they are <= 2e-4, what the C++ kernel gets
    # (0.7e-4 .. 1.2e-4): the fp32 rounding of zq ~ 1e3 itself.
    # N=37, D=48, D_ref=49, V=1031 with 2 vocab splits: ragged tiles, a partial D chunk, a merge.
    inputs = _offset_reference_inputs(dtype, 17, offset=1000.0)
    hidden, weight, labels, rh, rw, g_l, g_k = inputs
    logp, kl, ref_logp, grad_h, grad_w = run_triton(*inputs, kl_direction=kl_direction)
    ref = reference_logprob_kl(hidden, weight, labels, rh, rw, kl_direction, IGNORE, g_l, g_k)
    valid = labels != IGNORE
    assert 0 < valid.sum() < N and (kl[~valid] == 0).all()
    true_kl = ref.kl[valid]
    assert (true_kl > 1e-3).all()  # the relative bound is meaningful
    rel = ((kl[valid].double() - true_kl).abs() / true_kl).max().item()
    assert rel <= 1e-3, f"KL relative error {rel:.2e} at a per-token offset of 1e3"
    assert_close(logp, ref.logp, TOL[dtype], "logp")
    assert_close(ref_logp, ref.ref_logp, TOL[dtype], "ref_logp")
    # Gradients: the reverse KL's uses d - E_p[d], d = (z - m_p) - (zq - m_q), also shift-invariant.
    assert_close(grad_h, ref.grad_hidden, TOL[dtype], "grad_hidden")
    assert_close(grad_w, ref.grad_weight, TOL[dtype], "grad_weight")


def test_out_of_range_label_raises_through_the_public_entry():
    hidden, weight, labels, rh, rw, _, _ = make_inputs(torch.float32, seed=18, v=67)
    for bad_label in (67, -1):
        bad = labels.clone()
        bad[5] = bad_label
        with pytest.raises(ValueError, match=rf"label {bad_label} at token 5 is outside \[0, 67\)"):
            linear_logprob_kl(hidden, weight, bad, rh, rw, backend="triton")


@pytest.mark.parametrize("output", ["logp", "kl"])
def test_double_backward_raises(output):
    # create_graph=True through the op would silently drop the second-order terms (the upstream
    # gradient of .sum() does not require grad, so once_differentiable let it through).
    hidden, weight, labels, rh, rw, _, _ = make_inputs(torch.float32, seed=19, v=67)
    out = linear_logprob_kl_triton(hidden, weight, labels, rh, rw, config=CFG)
    value = out[0] if output == "logp" else out[1]
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(value.sum(), hidden, create_graph=True)


def test_public_dispatch_and_label_validation():
    hidden, weight, labels, rh, rw, _, _ = make_inputs(torch.float32, seed=12, v=67)
    out = linear_logprob_kl(hidden, weight, labels, rh, rw, kl_direction="reverse", backend="triton")
    expected = reference_logprob_kl(hidden, weight, labels, rh, rw, "reverse", IGNORE)
    assert_close(out.logp, expected.logp, 1e-4, "logp")
    assert_close(out.kl, expected.kl, 1e-4, "kl")
    bad = labels.clone()
    bad[0] = 67
    with pytest.raises(ValueError, match="labels"):
        linear_logprob_kl_triton(hidden, weight, bad)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_v=100)


def test_cpu_without_interpreter_raises_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch\n"
            "from synthunlearn.ops.triton_backend import linear_logprob_kl_triton, TritonBackendError\n"
            "try:\n"
            "    linear_logprob_kl_triton(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))\n"
            "except TritonBackendError as e:\n"
            "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "    print('raised')\n")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "raised" in result.stdout, result.stderr


def test_no_vocab_sized_tensor_is_created():
    # Every tensor any torch op produces (forward and backward, host side, including the
    # interpreter's byte copies of kernel arguments) is smaller than an N x V bf16 slab: the largest
    # is the fp32 dW buffer (V x D). Kernels themselves only hold on-chip tiles.
    from torch.utils._python_dispatch import TorchDispatchMode

    n, d, v = 64, 16, 1031
    sizes = []

    class RecordSizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append((t.numel() * t.element_size(), str(func)))
            return out

    inputs = make_inputs(torch.bfloat16, seed=13, n=n, d=d, d_ref=d, v=v)
    with RecordSizes():
        run_triton(*inputs, kl_direction="reverse")
    nbytes, op = max(sizes)
    assert nbytes <= 4 * v * d < 2 * n * v, f"{op} produced {nbytes} bytes (bf16 N x V: {2 * n * v})"
