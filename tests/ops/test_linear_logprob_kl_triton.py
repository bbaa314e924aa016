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


def test_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setenv(triton_backend.DETERMINISTIC_ENV, "1")
    inputs = make_inputs(torch.bfloat16, seed=11)
    first = run_triton(*inputs, kl_direction="reverse")
    second = run_triton(*inputs, kl_direction="reverse")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


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
