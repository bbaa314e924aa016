#!/usr/bin/env bash
# The GPU checks of the fused op in one command, on one CUDA GPU:
#   1. the machine: GPU, driver, Python packages;
#   2. the compiled Triton kernels against float64 on the GPU (tests/ops/test_linear_logprob_kl_cuda.py);
#   3. a dense bf16 matmul of the op's size, the ceiling its TFLOP/s are read against;
#   4. benchmarks/bench_linear_logprob_kl.py --device cuda at two real heads (Llama-3: D 4096,
#      V 128256; Gemma-2: D 2304, V 256000), N 8192, bf16: CE-only (ours, Liger, CCE, plain
#      PyTorch) and CE + KL to a reference head (ours, plain PyTorch).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR [all|tests|bench]]   (default: benchmarks/results/gpu_<date> all)
#
# "tests" runs steps 1-2, "bench" steps 1, 3 and 4 (a short lease can run other work between them).
# Liger-Kernel and Cut Cross-Entropy rows need those packages; the benchmark marks them skipped
# otherwise. Each step has a time limit (seconds: SUITE_TEST_S, SUITE_BENCH_S) so that one slow
# step cannot eat a short lease; a step that fails is reported and the next one still runs.
# The exit status is the tests' (0 when they are not run).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu_$(date +%F)}
steps=${2:-all}
case "$steps" in all|tests|bench) ;; *) echo "usage: $0 [OUT_DIR [all|tests|bench]]" >&2; exit 2;; esac
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
for name in ("triton", "transformers", "deepspeed", "liger_kernel", "cut_cross_entropy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "(no __version__)"))
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__)
EOF
} 2>&1 | tee "$out/environment.txt"

tests_status=0
if [ "$steps" != bench ]; then
  timeout "${SUITE_TEST_S:-300}" $PY -m pytest -q -p no:cacheprovider tests/ops/test_linear_logprob_kl_cuda.py 2>&1 \
    | tee "$out/cuda_tests.log"
  tests_status=${PIPESTATUS[0]}
fi
[ "$steps" = tests ] && exit "$tests_status"

# The ceiling: the op's largest matmul (N x D by D x V) alone, bf16 in, fp32 accumulate, via cuBLAS.
$PY - <<'EOF' 2>&1 | tee "$out/matmul_ceiling.txt"
import torch
from triton.testing import do_bench
for n, d, v in ((8192, 4096, 128256), (8192, 2304, 256000)):
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b.T, warmup=100, rep=500, return_mode="median")
    print(f"matmul bf16 N={n} D={d} V={v}: {ms:.3f} ms median, {2 * n * d * v / ms / 1e9:.0f} TFLOP/s")
EOF

shapes=8192x4096x128256,8192x2304x256000
timeout "${SUITE_BENCH_S:-240}" $PY benchmarks/bench_linear_logprob_kl.py --device cuda --dtype bfloat16 --no-ref \
  --impls triton,cce,liger_ce,torch --shapes "$shapes" --json "$out/bench_ce_only.json"
timeout "${SUITE_BENCH_S:-240}" $PY benchmarks/bench_linear_logprob_kl.py --device cuda --dtype bfloat16 \
  --impls triton,torch --shapes "$shapes" --json "$out/bench_ce_kl.json"
exit "$tests_status"
