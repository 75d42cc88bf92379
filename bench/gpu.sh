#!/usr/bin/env bash
# Every benchmark of DESIGN 5 on the LLaVA-1.5-7B shape (random bf16 weights, one CUDA GPU), in one call that
# should take 7 minutes (each part has its own time limit; 8 minutes in all at most):
#   bench/attention.py --gpu-only   sdpa forward, the attention probe, eager + output_attentions; 1 and 4 images
#   bench/generate.py  --gpu-only   prompts/s of generation + attention + perplexity, batch 1/4/16 vs the official way
#   bench/train.py     --gpu-only   one DPO pair step: TRL's plain step, each speed-up alone, both; gradient checkpointing
#
# Prepared for the project's device machine (an H200 whose image has torch, accelerate and an older
# transformers, but no TRL, datasets or pydantic-settings). From the repository root:
#   here:       bash bench/gpu-wheels.sh                       (the missing wheels into .whl/, git-ignored)
#   device run: command "bash bench/gpu.sh", carry [".whl"], timeout_s 540
# The tables go to stdout and, when $OUT is set (the device run's output folder), to $OUT/gpu-bench.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH=$PWD
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/miadpo-site .whl/*.whl \
        || { echo "gpu.sh: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/miadpo-site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log=${OUT:-/tmp}/gpu-bench.txt
: > "$log"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu.sh: no CUDA device"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
status=0
part() {  # part SECONDS SCRIPT ARGS...: one benchmark under its own time limit, output kept
    local limit=$1; shift
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$PY" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== rc $rc, $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}
part 120 bench/attention.py --gpu-only --images 1,4 --repeats 5
part 130 bench/generate.py --gpu-only --new-tokens 64
part 220 bench/train.py --gpu-only --steps 3
exit $status
