#!/usr/bin/env bash
# The GPU check of the training engine, in one go (under 9 minutes on one H100):
#   1. bf16 correctness smoke: LoRA and full fine-tuning of a tiny model in bf16 (first loss as
#      in fp32, finite non-zero gradient norms, falling loss);
#   2. the throughput table, ours against the Hugging Face Trainer side by side, at sequence 4096
#      with random weights at full size: Llama-3.2-1B full and Llama-3.1-8B LoRA.
# Results (JSON and a RESULTS.md of them) go to $OUT when set (the device tool brings it back),
# else to benchmarks/results/.
#
#   scripts/gather_wheels.sh                   # here, once: DeepSpeed and pydantic wheels into .whl/
#   benchmarks/gpu_check.sh                    # on the GPU machine (carry .whl)
#   benchmarks/gpu_check.sh --dry-run          # anywhere: the same steps on tiny models, a few steps, CPU
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
RESULTS_DIR=${OUT:-benchmarks/results}
mkdir -p "$RESULTS_DIR"

if [[ $DRY == 0 && -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

stamp() { echo "== $(date +%H:%M:%S) $*"; }

if [[ $DRY == 1 ]]; then
  stamp "dry run: tiny models on $("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
  "$PY" benchmarks/smoke.py --steps 8 --seq-len 128 --micro-batch 2 --rows 60 --vocab 600 --passages 150 \
    --min-drop 0.0 --out "$RESULTS_DIR/smoke-dryrun.json"
  "$PY" benchmarks/throughput.py --size tiny --seq-len 256 --micro-batch 2 --packing on --warmup 1 --steps 2 \
    --rows 40 --vocab 600 --passages 150 --threads 1 \
    --run llama-3.2-1b-instruct:full --run llama-3.1-8b-instruct:lora --out "$RESULTS_DIR/throughput-dryrun.json"
else
  "$PY" - <<'EOF'
import torch, transformers, peft, deepspeed
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__, "deepspeed", deepspeed.__version__)
EOF
  stamp "bf16 smoke"
  "$PY" benchmarks/smoke.py --out "$RESULTS_DIR/smoke-gpu.json"
  stamp "throughput: Llama-3.2-1B full and Llama-3.1-8B LoRA at 4096, with the HF Trainer"
  "$PY" benchmarks/throughput.py --size full --seq-len 4096 --micro-batch 1 --packing on --warmup 3 --steps 10 \
    --rows 400 --vocab 32768 --passages 4000 --data-workers 8 --workdir /tmp/gpu-check \
    --run llama-3.2-1b-instruct:full --run llama-3.1-8b-instruct:lora --out-dir "$RESULTS_DIR"
fi
stamp "table"
"$PY" benchmarks/table.py --results "$RESULTS_DIR" --out "$RESULTS_DIR/RESULTS.md"
stamp "done"
