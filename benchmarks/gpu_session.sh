#!/usr/bin/env bash
# The GPU benchmarks, as one script for a lent GPU machine (H100/H200 with PyTorch,
# no registry access). Usage:   bash benchmarks/gpu_session.sh smoke|full
#
# Needs wheels in .whl/ for what the machine's image lacks (diffusers, DeepCache,
# pydantic and friends) and for decodekit itself: run benchmarks/gpu_wheels.sh here
# first (after the last change to the package), and carry .whl.
# Session 3 ran it on an H200 (docs/benchmarks/gpu.md); 1-3 need the most
# device time (about 6 minutes in all). Session 4 ran it twice with SKIP_FD=1
# (SKIP_PROFILE=1 the second time). For the next GPU session, which checks
# query_bucket and the whole-run warm-up (steps 2, 3, 3b), run
#   SKIP_FD=1 SKIP_PROFILE=1 SKIP_EXAMPLES=1 bash benchmarks/gpu_session.sh full
# with a timeout of about 500 s: the whole-run warm-up makes 2 and 3 about 1.5x longer. Results go to $OUT/results.tar (re-written after every step, so a run cut off
# still returns what finished) and the log to $OUT/log.txt.
set -u
MODE=${1:-smoke}
OUT=${OUT:-/tmp/dk-gpu-out}
RES=/tmp/dk-gpu-results
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, diffusers, transformers, decodekit; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

pack() { tar -C "$RES" -cf "$OUT/results.tar" . ; }
step() {  # step NAME CMD...: run, time, pack
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" || echo "!!! $name failed (rc $?)"
    echo "=== $name took $((SECONDS - t0)) s"
    pack
}

DKV_LLADA=(--width 4096 --layers 8 --heads 32 --kv-heads 32 --intermediate 12288 --vocab 126464
           --device cuda --dtype bfloat16)
FD_SD15=(--device cuda --dtype float16 --width 320 --latent-size 64 --cross-dim 768)

if [ "$MODE" = smoke ]; then
    step fd-smoke python3 benchmarks/faster_diffusion_vs_deepcache.py --steps 6 --rounds 1 \
        --width 32 --latent-size 16 --device cuda --dtype float16 --out "$RES/fd_smoke"
    step dkv-smoke python3 benchmarks/dkv_cache.py --width 256 --layers 2 --vocab 1024 \
        --device cuda --dtype bfloat16 --gen-length 64 --block 32 --steps 64 --prompt 16 \
        --batches 2 --repeats 1 --out "$RES/dkv_smoke.json"
    step example-smoke python3 -m decodekit.cli bench examples/superposed.yaml --repeat 1 \
        --json "$RES/superposed_smoke.json" --png "$RES/superposed_smoke.png"
    exit 0
fi

# 0. The CUDA oracles: every strategy on the GPU equals the same run on the CPU.
step cuda-tests python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py
# 1. Where a dkv-cache step spends its time (profiler tables, host reads per step);
#    SKIP_PROFILE=1 leaves it out.
[ "${SKIP_PROFILE:-0}" = 1 ] || step dkv-profile python3 benchmarks/profile_dkv.py --out "$RES/profile_dkv.txt"
# 2. dkv-cache on LLaDA-8B's layer shape (8 of its 32 layers), gen 256, block 32, 256 steps.
step dkv-p64 python3 benchmarks/dkv_cache.py "${DKV_LLADA[@]}" --prompt 64 \
    --gen-length 256 --block 32 --steps 256 --batches 1 8 --repeats 2 \
    --configs decode greedy prefill pd --out "$RES/dkv_cache_llada_gpu_p64.json"
# 3. A few-shot-length prompt (512 tokens), where caching the prompt pays.
step dkv-p512 python3 benchmarks/dkv_cache.py "${DKV_LLADA[@]}" --prompt 512 \
    --gen-length 256 --block 32 --steps 256 --batches 8 --repeats 2 \
    --configs decode prefill pd --out "$RES/dkv_cache_llada_gpu_p512.json"
# 3b. The same 64-token rows with exact query widths (query_bucket 1): against the
#     default bucket of 16, in steady state (times_s) and on the first call (warmup_s).
step dkv-p64-bucket1 python3 benchmarks/dkv_cache.py "${DKV_LLADA[@]}" --prompt 64 \
    --gen-length 256 --block 32 --steps 256 --batches 8 --repeats 2 --query-bucket 1 \
    --configs decode pd --out "$RES/dkv_cache_llada_gpu_p64_bucket1.json"
# 3c. Fast-dLLM's block caches beside dkv-cache (issue 21's table): batch 1 and 8, prompts of
#     64 and 512, each cache alone and with threshold decoding.
step dllm-caches-p64 python3 benchmarks/dkv_cache.py "${DKV_LLADA[@]}" --prompt 64 \
    --gen-length 256 --block 32 --steps 256 --batches 1 8 --repeats 2 \
    --configs decode pd block-prefix block-dual threshold decode+threshold \
    block-prefix+threshold block-dual+threshold --out "$RES/dllm_caches_llada_gpu_p64.json"
step dllm-caches-p512 python3 benchmarks/dkv_cache.py "${DKV_LLADA[@]}" --prompt 512 \
    --gen-length 256 --block 32 --steps 256 --batches 1 8 --repeats 2 \
    --configs pd block-prefix block-dual decode+threshold block-dual+threshold \
    --out "$RES/dllm_caches_llada_gpu_p512.json"
# 4. Faster-Diffusion vs DeepCache on SD 1.5's UNet at full width, fp16, 512x512 latents
#    (SKIP_FD=1 leaves it out, for a session whose Faster-Diffusion code is already measured).
[ "${SKIP_FD:-0}" = 1 ] || step fd-sd15 python3 benchmarks/faster_diffusion_vs_deepcache.py --steps 50 --rounds 3 \
    "${FD_SD15[@]}" --out "$RES/faster_diffusion_vs_deepcache_sd15_gpu"
# 5. The example rows (zoo models) on the GPU (SKIP_EXAMPLES=1 leaves them out).
[ "${SKIP_EXAMPLES:-0}" = 1 ] || step examples python3 benchmarks/examples_table.py --repeat 3 --out "$RES/examples_gpu"
echo "=== all done"
