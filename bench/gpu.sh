#!/usr/bin/env bash
# The prepared device check (at most ~8 minutes on one H100/H200): the sources preset's Shakespeare GPT trained and
# evaluated through the study's own code, beside nanoGPT's loop (bench/nanogpt.py) on the same GPU, and the race to
# quality: the study's training time to nanoGPT's whole-split val loss (and to the published 1.4697).
#
# The device machine has torch, numpy, tokenizers, safetensors, tqdm and pyyaml but no pydantic and no network,
# so it runs from the working tree with the missing packages carried as wheels. Here, once:
#     make gpu-wheels                          # pydantic and its needs, as manylinux wheels, into .whl/
#     dvc repro tokenize@shakespeare-char      # the tokenized corpus (git-ignored: it must be carried)
# then through the device tool:
#     run(command="bash bench/gpu.sh", carry=[".whl", "tokenizers/shakespeare-char"], timeout_s=600)
# and commit the file it leaves in $OUT as reports/gpu/<date>-<gpu>.md. Without a GPU it runs on the CPU (hours).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
out="${OUT:-reports/gpu}"
mkdir -p "$out"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' || true)"
file="$out/$(date +%F)-${gpu:-cpu}.md"
nvidia-smi || true
python3 -c 'import torch, pydantic; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "pydantic", pydantic.VERSION)'
python3 -m bench.gpu_check --out "$file" "$@"
echo "wrote $file"
