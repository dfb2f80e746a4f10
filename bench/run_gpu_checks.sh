#!/usr/bin/env bash
# Everything that needs a GPU, in one go (CI has none): the CUDA-marked tests, then the GPU benchmarks.
# Logs and results go to $OUT (default ./out); a short table is printed last.
#   bash bench/run_gpu_checks.sh            # on the lent device: OUT is set by the tool
# Add your benchmark as one more `bench` line below; it should print its own short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Packages the device image lacks (bitsandbytes, fastapi, uvicorn, gguf), unpacked here and carried along:
#   pip install --no-deps --target .devsite --python-version 3.12 --only-binary=:all: --platform ... WHEELS
[ -d .devsite ] && export PYTHONPATH="$PYTHONPATH:$PWD/.devsite"
PY=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"

# Modules that cannot be imported here (server tests need uvicorn, openai) are reported, not fatal:
# only failed tests fail the run.
"$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$OUT/cuda_tests.log"
tail -1 "$OUT/cuda_tests.log" | grep -qE " failed|no tests ran" && status=1

bench() {  # bench NAME COMMAND...: run one benchmark, log to $OUT/NAME.log
    local name=$1; shift
    "$@" 2>&1 | tee "$OUT/$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
bench offload_bench "$PY" bench/offload_bench.py --json "$OUT/offload_bench.json" --markdown "$OUT/offload_bench.md"
bench load_bench "$PY" bench/load_bench.py --methods pin_after  # writes /tmp/load_bench_7b, which app_prefill reads
bench app_prefill "$PY" bench/app_prefill.py --run 3GiB:4096:1024,3900 --run 6GiB:8448:8000 --repeats 3
bench cpu_kernels "$PY" bench/cpu_kernels.py --runs 50
bench cpu_decode "$PY" bench/cpu_decode.py --shape smollm2-135m --repeats 3 --tokens 48  # all cores: 16 on the lent host
bench gguf_bench "$PY" bench/gguf_bench.py --markdown "$OUT/gguf_bench.md"
bench decode_bench "$PY" bench/decode_bench.py --modes fp16,int4,pytiny,app --json "$OUT/decode_bench.json" \
    --markdown "$OUT/decode_bench.md"
bench int4_gemm_bench "$PY" bench/int4_gemm_bench.py
# Our int4 GEMV beside tinygemm per matrix, then the resident 7B step with tinygemm instead (decode_bench above has ours).
bench int4_gemv_bench "$PY" bench/int4_gemv_bench.py --markdown "$OUT/int4_gemv_bench.md"
bench decode_bench_int4_tinygemm env LLAMA_OFFLOAD_INT4_GEMV=0 "$PY" bench/decode_bench.py --modes int4 \
    --markdown "$OUT/decode_bench_int4_tinygemm.md"
bench decode_perplexity "$PY" bench/decode_perplexity.py --device cuda  # what the int8-rounded activations cost
bench speculative_bench "$PY" bench/speculative_bench.py --modes stream_fp16,stream_int4,resident --prompts 2 \
    --new-tokens 64 --repeats 2 --json "$OUT/speculative_bench.json" --markdown "$OUT/speculative_bench.md"
bench int8_tree_rows_bench "$PY" bench/int8_tree_rows_bench.py  # an exact tree's int8 rows: one dequantize a matrix
bench batch_bench "$PY" bench/batch_bench.py --mode stream_fp16 --streams 1,4,16,64 --markdown "$OUT/batch_bench.md"
# Several GPUs (issue 15): only where two or more are visible (the split on one GPU is among the CUDA tests).
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then bench multi_gpu_bench "$PY" bench/multi_gpu_bench.py --markdown "$OUT/multi_gpu_bench.md"; else echo "multi_gpu_bench: skipped (fewer than 2 GPUs visible)"; fi

echo
echo "== summary =="
echo "GPU: $(head -1 "$OUT/gpu.txt")"
echo "CUDA tests: $(tail -1 "$OUT/cuda_tests.log")"
for md in "$OUT"/*.md; do
    [ -f "$md" ] && { echo; cat "$md"; }
done
exit $status
