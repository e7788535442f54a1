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
# with a timeout of about 500 s: the whole-run warm-up makes 2 and 3 about 1.5x longer.
# The dLLM caches' table alone (steps 3c-3e: baseline, every dkv-cache variant, block-cache
# prefix and dual, each with and without threshold decoding and compile, batch 1 and 8,
# prompts 64 and 512, and a CUDA-graphs check) is   bash benchmarks/gpu_session.sh dllm
# An estimate from the H200 session's step times: 3c about 8 minutes (p512 and p64), 3d
# 2-3, 3e 6-10 (compiles): more than one 600 s call and likely more than one session's
# 15 minutes. Run it with a timeout of 590 s; each step's results are packed when it ends,
# so rerun with DLLM_SKIP="3c-p512 3c-p64 ..." naming the steps that finished.
# On a CPU, CPU_SMOKE=1 PY=.venv/bin/python bash benchmarks/gpu_session.sh dllm runs every
# step's command at tiny widths on the CPU (no wheels, no nvidia-smi): a check that they run
# (the same for the code, caches, vlm and mar modes).
# Results go to $OUT/results.tar (re-written after every step, so a run cut off
# still returns what finished) and the log to $OUT/log.txt.
set -u
MODE=${1:-smoke}
OUT=${OUT:-/tmp/dk-gpu-out}
RES=${RES:-/tmp/dk-gpu-results}
PY=${PY:-python3}
CPU_SMOKE=${CPU_SMOKE:-0}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ "$CPU_SMOKE" != 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
fi
$PY -c "import torch, diffusers, transformers, decodekit; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

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
# LLaDA's GSM8K setting: gen length 256, blocks of 32, one token a step without threshold
DLLM_GEN=(--gen-length 256 --block 32 --steps 256)
P64=64; P512=512; BACKEND=inductor
if [ "$CPU_SMOKE" = 1 ]; then  # the same commands at tiny widths on the CPU (step 3e traced
    DKV_LLADA=(--width 64 --layers 2 --vocab 256 --device cpu --dtype float32)  # by aot_eager,
    DLLM_GEN=(--gen-length 16 --block 8 --steps 16)  # as inductor's C++ builds take minutes)
    P64=8; P512=24; BACKEND=aot_eager
fi

# 3c-3e: Fast-dLLM's block caches beside dkv-cache: every row of benchmarks/dkv_cache.py
# (baseline; decode, greedy, prefill, pd; threshold; each dkv-cache variant +threshold;
# block-prefix, block-dual, each +threshold), batch 1 and 8, one timed run after a
# whole-run warm-up (warmup_s), then the same with the model call compiled (inductor;
# warmup_s is then the first call's compile), then CUDA graphs (reduce-overhead) on the
# rows whose in-place cache writes they must accept: compile_counters.cudagraph_skips = 0
# means every graph was captured; the log (TORCH_LOGS=cudagraphs) says why one was not.
skipped() { case " ${DLLM_SKIP:-} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
dllm_steps() {
    local p
    for p in "$P512" "$P64"; do
        skipped "3c-p$p" || step "3c-p$p" $PY benchmarks/dkv_cache.py "${DKV_LLADA[@]}" \
            --prompt "$p" "${DLLM_GEN[@]}" --batches 1 8 --repeats 1 \
            --out "$RES/dllm_caches_llada_gpu_p$p.json"
    done
    skipped 3d-cudagraphs || TORCH_LOGS=cudagraphs step 3d-cudagraphs $PY benchmarks/dkv_cache.py \
        "${DKV_LLADA[@]}" --prompt "$P512" "${DLLM_GEN[@]}" --batches 1 --repeats 1 \
        --compile reduce-overhead --configs decode pd block-prefix block-dual block-dual+threshold \
        --out "$RES/dllm_caches_llada_gpu_p${P512}_cudagraphs.json"
    for p in "$P512" "$P64"; do
        skipped "3e-compile-p$p" || step "3e-compile-p$p" $PY benchmarks/dkv_cache.py \
            "${DKV_LLADA[@]}" --prompt "$p" "${DLLM_GEN[@]}" --batches 1 8 --repeats 1 \
            --compile "$BACKEND" --out "$RES/dllm_caches_llada_gpu_p${p}_compile.json"
    done
}

if [ "$MODE" = dllm ]; then
    dllm_steps
    echo "=== all done"
    exit 0
fi

# 6. CoDe at VAR-d30 (drafter) / VAR-d16 (refiner) widths, random weights, bfloat16: wall time
#    and peak memory of the drafter alone and of code at 8 and 6 drafter scales of 10, batch 8
#    and 32, in alternating pairs (a few minutes; weights are drawn on the GPU). Alone:
#    bash benchmarks/gpu_session.sh code; in full, SKIP_CODE=1 leaves it out.
CODE_W=(--device cuda --dtype bfloat16 --depths 30 16 --batch 8 32 --repeat 5)
if [ "$CPU_SMOKE" = 1 ]; then
    CODE_W=(--device cpu --dtype float32 --depths 2 1 --width-per-depth 16 --head-dim 16
            --vq-ch 32 --batch 2 --repeat 1 --threads 1)
fi
code_steps() {
    step code-d30-d16 $PY benchmarks/code_widths.py "${CODE_W[@]}" --splits 8 6 \
        --out "$RES/code_widths_d30_d16_gpu.json"
}
if [ "$MODE" = code ]; then
    code_steps
    echo "=== all done"
    exit 0
fi

# 7. Every feature cache side by side at SD 1.5's and SD3-medium's widths (random weights,
#    float16, 2 prompts): decodekit's points against the DeepCache package, diffusers' caches
#    by hand and cache-dit (its wheel in .whl), one Pareto table and chart per model (a few
#    minutes each). Alone: bash benchmarks/gpu_session.sh caches; in full, SKIP_CACHES=1.
CACHES_SD15=(--model random-sd15 --width 320 --latent-size 64 --device cuda --dtype float16
             --prompts 2 --repeat 3)
CACHES_SD3=(--model random-sd3 --width 1536 --layers 24 --latent-size 64 --device cuda
            --dtype float16 --prompts 2 --repeat 3)
if [ "$CPU_SMOKE" = 1 ]; then
    CACHES_SD15=(--model random-sd15 --width 32 --latent-size 16 --steps 6 --prompts 2 --repeat 1)
    CACHES_SD3=(--model random-sd3 --width 64 --layers 2 --latent-size 16 --steps 10 --prompts 2
                --repeat 1)
fi
caches_steps() {
    step caches-sd15 $PY benchmarks/feature_caches.py "${CACHES_SD15[@]}" \
        --out "$RES/feature_caches_sd15_gpu"
    step caches-sd3 $PY benchmarks/feature_caches.py "${CACHES_SD3[@]}" \
        --out "$RES/feature_caches_sd3_gpu"
}
if [ "$MODE" = caches ]; then
    caches_steps
    echo "=== all done"
    exit 0
fi

# 8. Token pruning at LLaVA-1.5-7B's widths (CLIP ViT-L/336 tower, Llama-7B; random weights,
#    bfloat16): baseline, fastv and dynamic-llava (its training-free scorer) at keep 0.25 after
#    layer 2, batch 1 and 8, 64 text tokens after the 576 image tokens, 128 new tokens: prefill
#    and decode time, K/V cache held, peak memory above the weights, in alternating order (an
#    estimate: 1-3 minutes after the model is drawn). Alone: bash benchmarks/gpu_session.sh vlm
#    (timeout about 400 s); in full, SKIP_VLM=1.
VLM_W=(--device cuda --dtype bfloat16 --batch 1 8 --repeat 3)
if [ "$CPU_SMOKE" = 1 ]; then
    VLM_W=(--tiny --device cpu --dtype float32 --batch 1 2 --repeat 1 --text 8 --new 8 --threads 1)
fi
vlm_steps() {
    step vlm-llava7b $PY benchmarks/vlm.py "${VLM_W[@]}" --out "$RES/vlm_llava7b_gpu.json"
}
if [ "$MODE" = vlm ]; then
    vlm_steps
    echo "=== all done"
    exit 0
fi

# 9. CSpD at the released models' widths: MAR-B drafting for MAR-L at 256 px (random weights,
#    bfloat16, KL-16 shape; both heads start at zero output, so every draft is kept: the most
#    either acceptance rule can save), 32 class rows, 64 steps, guidance 3 (linear), 2 pairs after
#    a warm-up (an estimate: 1 minute to build and save the weights, 2-4 minutes of runs).
#    Alone: bash benchmarks/gpu_session.sh mar (timeout about 500 s); in full, SKIP_MAR=1.
MAR_W=(--released --device cuda --dtype bfloat16 --rows 32 --num-iter 64 --repeat 2)
if [ "$CPU_SMOKE" = 1 ]; then
    MAR_W=(--device cpu --dtype float32 --rows 2 --num-iter 4 --repeat 1)
fi
mar_steps() {
    step cspd-mar-b-l $PY benchmarks/cspd_compute.py "${MAR_W[@]}" --out "$RES/cspd_mar_b_l_gpu"
}
if [ "$MODE" = mar ]; then
    mar_steps
    echo "=== all done"
    exit 0
fi

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
# 3c-3e. Fast-dLLM's block caches beside dkv-cache, with and without compile (above).
dllm_steps
# 4. Faster-Diffusion vs DeepCache on SD 1.5's UNet at full width, fp16, 512x512 latents
#    (SKIP_FD=1 leaves it out, for a session whose Faster-Diffusion code is already measured).
[ "${SKIP_FD:-0}" = 1 ] || step fd-sd15 python3 benchmarks/faster_diffusion_vs_deepcache.py --steps 50 --rounds 3 \
    "${FD_SD15[@]}" --out "$RES/faster_diffusion_vs_deepcache_sd15_gpu"
# 5. The example rows (zoo models) on the GPU (SKIP_EXAMPLES=1 leaves them out).
[ "${SKIP_EXAMPLES:-0}" = 1 ] || step examples python3 benchmarks/examples_table.py --repeat 3 --out "$RES/examples_gpu"
# 6. CoDe at VAR-d30/d16 widths (above).
[ "${SKIP_CODE:-0}" = 1 ] || code_steps
# 7. The feature caches at SD 1.5 / SD3 widths (above).
[ "${SKIP_CACHES:-0}" = 1 ] || caches_steps
# 8. Token pruning at LLaVA-1.5-7B's widths (above).
[ "${SKIP_VLM:-0}" = 1 ] || vlm_steps
# 9. CSpD at MAR-B/MAR-L widths (above).
[ "${SKIP_MAR:-0}" = 1 ] || mar_steps
echo "=== all done"
