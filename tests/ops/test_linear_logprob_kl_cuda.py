"""The Triton backend compiled for a GPU, against float64 ground truth computed on the same GPU.

Skipped without CUDA (CI has none); run it in its own pytest process, apart from the interpreter
tests, which set TRITON_INTERPRET=1 for the whole process:

    python -m pytest -q tests/ops/test_linear_logprob_kl_cuda.py

The interpreter tests cover the logic on tiny shapes; these check what only the compiled kernels
can get wrong (the default GPU tiles, tl.dot precision, atomics, many vocabulary splits) at the
sizes the trainer runs: vocabularies of 50-256 k that no tile divides, token counts that no block
divides, and D up to 4096. The float64 reference materialises N x V on the GPU, so the largest
case needs ~40 GB of GPU memory.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: these tests compile the kernels; run them in their own process",
                allow_module_level=True)

from synthunlearn.ops import linear_logprob_kl  # noqa: E402
from synthunlearn.ops.triton_backend import GPU_CONFIG, TileConfig  # noqa: E402
from tests.ops.triton_checks import IGNORE, TOL, check_against_float64, random_inputs, run_triton  # noqa: E402

CUDA = torch.device("cuda")
# Odd on every axis for the default tiles (64 x 128 x 64): 17 token blocks (the last 7 rows),
# 393 vocabulary tiles (the last 81 wide), 4 D chunks (the last 8 wide), a reference of another width.
ODD = dict(n=1031, d=200, d_ref=136, v=50257)


def inputs(dtype, seed, **kw):
    return random_inputs(dtype, seed=seed, device=CUDA, **{**ODD, **kw})


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_tiles_match_float64(dtype, kl_direction, deterministic):
    check_against_float64(inputs(dtype, seed=1), kl_direction, deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_without_reference(dtype):
    check_against_float64(inputs(dtype, seed=2, with_ref=False))


@pytest.mark.parametrize("kl_direction", ["forward", "reverse"])
def test_peaked_logits(kl_direction):
    # A trained model's logits are peaked: |z| up to ~1e2 here; the streaming LSE must not overflow.
    check_against_float64(inputs(torch.float32, seed=3, logit_scale=30.0), kl_direction)


def test_tf32_precision():
    # tf32 operands keep 10 mantissa bits: ~1e-3 relative on the logits, hence the looser bound.
    check_against_float64(inputs(torch.float32, seed=4), "forward", tol=5e-3,
                          config=TileConfig(fp32_precision="tf32"))


def test_few_tokens_use_many_vocab_splits():
    # N = 5: one token block, so the forward splits the 1002 vocabulary tiles over ~2 programs per SM.
    check_against_float64(random_inputs(torch.bfloat16, seed=5, device=CUDA, n=5, d=256, d_ref=256, v=128256),
                          "forward")


def test_frozen_head_and_frozen_hidden():
    hidden, weight, labels, rh, rw, g_l, g_k = inputs(torch.bfloat16, seed=6)
    _, _, _, grad_h, grad_w = check_against_float64((hidden, weight.detach(), labels, rh, rw, g_l, g_k), "forward")
    assert grad_h is not None and grad_w is None
    _, _, _, grad_h, grad_w = check_against_float64((hidden.detach(), weight, labels, rh, rw, g_l, g_k), "reverse")
    assert grad_h is None and grad_w is not None


@pytest.mark.parametrize("shape", [dict(n=4099, d=4096, d_ref=4096, v=128256),
                                   dict(n=2053, d=2304, d_ref=2304, v=256000)], ids=["llama3", "gemma2"])
def test_full_size_bf16(shape):
    # The trainer's regime: bf16 policy and reference heads of real vocabularies, forward KL.
    check_against_float64(random_inputs(torch.bfloat16, seed=7, device=CUDA, **shape), "forward")


def test_all_tokens_ignored():
    hidden, weight, labels, rh, rw, g_l, g_k = inputs(torch.bfloat16, seed=8, ignored_fraction=1.0)
    logp, kl, ref_logp, grad_h, grad_w = run_triton(hidden, weight, labels, rh, rw, g_l, g_k, kl_direction="reverse")
    for t in (logp, kl, ref_logp, grad_h, grad_w):
        assert torch.count_nonzero(t) == 0


def test_deterministic_mode_is_bitwise_reproducible():
    args = inputs(torch.bfloat16, seed=9)
    first = run_triton(*args, kl_direction="reverse", deterministic=True)
    second = run_triton(*args, kl_direction="reverse", deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_public_dispatch_picks_triton_on_cuda():
    hidden, weight, labels, rh, rw, _, _ = inputs(torch.float32, seed=10)
    auto = linear_logprob_kl(hidden, weight, labels, rh, rw, backend="auto")
    explicit = linear_logprob_kl(hidden, weight, labels, rh, rw, backend="triton")
    oracle = linear_logprob_kl(hidden, weight, labels, rh, rw, backend="torch")
    assert torch.equal(auto.logp, explicit.logp) and torch.equal(auto.kl, explicit.kl)
    valid = labels != IGNORE
    for name in ("logp", "kl", "ref_logp"):
        a, b = getattr(auto, name)[valid], getattr(oracle, name)[valid]
        # the oracle runs fp32 cuBLAS (TF32 off by default in torch): both are ~1e-6 from float64
        assert (a - b).abs().max() <= TOL[torch.float32] * b.abs().max(), name


def test_gpu_config_is_the_default():
    # What the trainer gets on CUDA when it names no config.
    from synthunlearn.ops.triton_backend import _default_config
    assert _default_config(CUDA) == GPU_CONFIG
