#!/usr/bin/env bash
# One prepared check of the library on one CUDA GPU, for someone who has one: at most 8
# minutes (the parts' limits add up to 480 s). Run from anywhere; results go to $OUT (default
# ./gpu_check_out): log (everything) and one file per part. Needs torch with CUDA, transformers, tokenizers, safetensors, numpy,
# pyyaml, typer, pydantic (pip install -e . installs them); the project runs from source.
#
#   bash benchmarks/gpu_check.sh
#
# Parts, cheapest first so that a broken setup fails early:
#   1. the test suite's CUDA-marked tests (chunked loss on the GPU, a bf16 run)
#   2. bf16 throughput and MFU (data-sheet peak and a measured bf16 matmul) of `base` and `1b`,
#      eager and torch.compile, at the largest batch that fits (benchmarks/gpu_throughput.py)
#   3. FSDP2 on one GPU (the library's sharding in a group of one), `base`, eager
#   4. peak memory with and without the chunked loss: head + loss at V = 8K/32K/128K
#      (benchmarks/loss_memory.py), and a whole `base` step with loss_chunks 1 vs auto
# Each part has its own time limit, so one that hangs cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
START=$(date +%s)

part() {  # part NAME SECONDS COMMAND...: run with a limit, tee to $OUT/NAME.txt and $OUT/log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - START ))s): $*" | tee -a "$OUT/log"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" >> "$OUT/log"
    local rc=${PIPESTATUS[0]}
    tail -n 25 "$OUT/$name.txt"
    echo "=== $name: exit $rc" | tee -a "$OUT/log"
}

part env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
    \"transformers\", transformers.__version__, \"gpu\", torch.cuda.get_device_name())'"
part cuda_tests 75 $PY -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
part throughput_base 120 $PY benchmarks/gpu_throughput.py --preset base --batch-size auto --steps 10
part throughput_1b 150 $PY benchmarks/gpu_throughput.py --preset 1b --batch-size auto --steps 5
part fsdp_one_gpu 45 $PY benchmarks/gpu_throughput.py --preset base --batch-size 32 --steps 10 --fsdp --no-compile
part loss_memory 30 $PY benchmarks/loss_memory.py --dtype bf16 --repeats 5 --limit-gib 0
for chunks in 1 auto; do
    part "step_memory_chunks_$chunks" 20 $PY benchmarks/gpu_throughput.py --preset base --batch-size 64 \
        --steps 5 --no-compile --loss-chunks "$chunks"
done
echo "=== done in $(( $(date +%s) - START ))s; the whole log: $OUT/log" | tee -a "$OUT/log"
