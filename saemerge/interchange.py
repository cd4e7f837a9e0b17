"""Converting SAEs between our format, SAELens and EleutherAI's sparsify.

Ours (`cfg.json` + `sae.safetensors`, see sae.py) divides inputs by `act_scale` s:
    pre = (x / s - b_dec) @ W_enc + b_enc,   out = (z @ W_dec + b_dec) * s.
SAELens (`cfg.json` + `sae_weights.safetensors`) and sparsify (`cfg.json` + `sae.safetensors`, the encoder stored
as `encoder.weight` = W_enc.T) work on raw activations:
    pre = (x - b_dec) @ W_enc + b_enc,       out = z @ W_dec + b_dec.
Exporting folds s into the weights (W_enc / s, b_dec * s, W_dec * s): the files give the same codes as ours on raw
activations. Imports get act_scale 1.

What is exact: export -> import reconstructs as ours up to float32 rounding (the folded scale); codes are the
same up to that rounding (so the same active sets but for near-ties). Import -> export of a SAELens or sparsify
file writes its tensors back bit for bit, in float32 (bfloat16 / float16 files are widened, which is exact).
Two SAELens options are folded into the weights on import, exactly in real arithmetic, so such files do not come
back bit for bit: `apply_b_dec_to_input: false` (b_enc += b_dec @ W_enc) and `rescale_acts_by_decoder_norm`
(decoder rows to unit norm, their norms into W_enc and b_enc). Other SAELens architectures (jumprelu, gated,
...) and options (input normalisation, hook_z reshaping), and sparsify's groupmax, skip connection and
transcoders are refused with a ValueError. Checked against SAELens 6.54.12 and eai-sparsify 1.3.3.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .sae import SAEConfig, SparseAutoencoder

FORMATS = ("saelens", "sparsify")
# SAELens reads a cfg.json without a version >= 6 as its older flat layout and drops the nested metadata.
SAELENS_CONFIG_VERSION = "6.0.0"


def export_sae(sae: SparseAutoencoder, folder: str | Path, format: str = "saelens", hook_name: str | None = None,
               model_name: str | None = None, context_size: int | None = None) -> Path:
    """Write `sae` into `folder` as a SAELens or sparsify SAE; `hook_name` is the module path it reads."""
    if format not in FORMATS:
        raise ValueError(f"unknown format '{format}'; expected one of {', '.join(FORMATS)}")
    cfg = sae.cfg
    if format == "sparsify" and cfg.activation != "topk":
        raise ValueError(f"format sparsify holds TopK SAEs only; this SAE's activation is {cfg.activation}")
    s = sae.act_scale
    W_enc, b_enc, W_dec, b_dec = (t.detach().cpu().contiguous()
                                  for t in (sae.W_enc / s, sae.b_enc, sae.W_dec * s, sae.b_dec * s))
    if format == "saelens":
        weights = "sae_weights.safetensors"
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        metadata = {"model_name": model_name, "hook_name": hook_name, "hf_hook_name": hook_name,
                    "context_size": context_size, "sae_lens_version": SAELENS_CONFIG_VERSION}
        config = {"architecture": "standard" if cfg.activation == "relu" else "topk", "d_in": cfg.d_in,
                  "d_sae": cfg.d_sae, "dtype": str(W_enc.dtype).removeprefix("torch."), "device": "cpu",
                  "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                  "metadata": {k: v for k, v in metadata.items() if v is not None}}
        if cfg.activation == "topk":
            config |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    else:
        weights = "sae.safetensors"
        tensors = {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        # normalize_decoder false: after folding, decoder rows have norm s, and sparsify's trainer would
        # renormalise them (changing the SAE) if this said true.
        config = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": False,
                  "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": False,
                  "transcode": False, "d_in": cfg.d_in}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / weights)
    (folder / "cfg.json").write_text(json.dumps(config, indent=2))
    return folder


def import_sae(folder: str | Path) -> SparseAutoencoder:
    """Read an SAE folder in our format, SAELens' or sparsify's, told apart by their files."""
    folder = Path(folder)
    cfg = folder / "cfg.json"
    if cfg.is_file() and (folder / "sae_weights.safetensors").is_file():
        return _from_saelens(json.loads(cfg.read_text()), load_file(folder / "sae_weights.safetensors"))
    if cfg.is_file() and (folder / "sae.safetensors").is_file():
        with safe_open(folder / "sae.safetensors", "pt") as f:
            ours = "W_enc" in f.keys()
        if ours:
            return SparseAutoencoder.load(folder)
        return _from_sparsify(json.loads(cfg.read_text()), load_file(folder / "sae.safetensors"))
    raise ValueError("not an SAE folder; expected cfg.json with sae.safetensors (saemerge, sparsify) or "
                     "sae_weights.safetensors (SAELens)")


def _from_saelens(cfg: dict, tensors: dict) -> SparseAutoencoder:
    architecture = cfg.get("architecture", "standard")
    if cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk":  # configs written before SAELens 6
        architecture, cfg["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
    if architecture not in ("standard", "topk"):
        raise ValueError(f"SAELens architecture '{architecture}' is not supported; expected standard or topk")
    if cfg.get("normalize_activations", "none") not in ("none", None, False):
        raise ValueError(f"normalize_activations '{cfg['normalize_activations']}' is not supported; expected none")
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"reshape_activations '{cfg['reshape_activations']}' is not supported; expected none")
    scaling = tensors.pop("scaling_factor", None)  # older files carry one; SAELens drops it when it is all ones
    if scaling is not None and not torch.all(scaling == 1):
        raise ValueError("a finetuning scaling_factor is not supported")
    W_enc, b_enc, W_dec, b_dec = _tensors(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"])
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = b_enc + b_dec @ W_enc
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre * |row| and decodes codes / |row|: the same as unit rows with the norms in the encoder.
        norm = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norm, b_enc * norm, W_dec / norm[:, None]
    activation = "relu" if architecture == "standard" else "topk"
    return _build(cfg["d_in"], cfg["d_sae"], activation, cfg.get("k", 32), W_enc, b_enc, W_dec, b_dec)


def _from_sparsify(cfg: dict, tensors: dict) -> SparseAutoencoder:
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"sparsify activation '{cfg['activation']}' is not supported; expected topk")
    if cfg.get("skip_connection") or cfg.get("transcode"):
        raise ValueError("sparsify skip connections and transcoders are not supported")
    d_sae = cfg.get("num_latents") or cfg["d_in"] * cfg["expansion_factor"]
    W_enc_T, b_enc, W_dec, b_dec = _tensors(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"])
    return _build(cfg["d_in"], d_sae, "topk", cfg["k"], W_enc_T.T, b_enc, W_dec, b_dec)


def _tensors(tensors: dict, names: list[str]) -> list[torch.Tensor]:
    if set(tensors) != set(names):
        raise ValueError(f"the weights file holds {sorted(tensors)}; expected {names}")
    return [tensors[name].float() for name in names]


def _build(d_in: int, d_sae: int, activation: str, k: int, W_enc, b_enc, W_dec, b_dec):
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for (name, shape), tensor in zip(shapes.items(), (W_enc, b_enc, W_dec, b_dec)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {shape} from cfg.json")
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, bias=True))
    sae.load_state_dict({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "act_scale": torch.ones(())})
    return sae
