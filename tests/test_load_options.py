"""The load options people type every day: `dtype` (float32, bfloat16, float16, "auto") and `device_map`."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from saemerge.modeling import OUTPUT_CACHE, SAEMergedForCausalLM

# Largest change of any next-token log-probability against the float32 model. For scale, on these models the SAE
# exchange itself moves log-probabilities by up to 0.2-0.4 (measured: merged against scale 0).
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.005}


@pytest.fixture(scope="module")
def saved(merges, tmp_path_factory):
    """The target and router wirings (gates and router with non-zero weights) saved as folders."""
    root = tmp_path_factory.mktemp("dtype")
    for kind in ("target", "router"):
        merges[kind].save_pretrained(root / kind)
    return root


def log_probs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float().log_softmax(-1)[batch["attention_mask"].bool()]


@pytest.mark.parametrize("kind", ["target", "router"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_whole_and_stays_close_to_float32(saved, batch, kind, dtype):
    expected = log_probs(AutoModelForCausalLM.from_pretrained(saved / kind, dtype=torch.float32), batch)
    model = AutoModelForCausalLM.from_pretrained(saved / kind, dtype=dtype)
    assert isinstance(model, SAEMergedForCausalLM)
    # Sources, SAEs (scales included), gates and router alike: no module left in float32 by accident.
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {b.dtype for name, b in model.named_buffers() if name.endswith("act_scale")} == {dtype}
    assert (log_probs(model, batch) - expected).abs().max() < TOLERANCE[dtype]
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    # Heads mixed by the router are mixed in float32 on purpose; one head's logits keep the model's dtype.
    assert out.logits.dtype == (torch.float32 if kind == "router" else dtype)
    keys = [layer.keys for cache in getattr(out, OUTPUT_CACHE).caches.values() for layer in cache.layers
            if layer.is_initialized]
    assert keys and {k.dtype for k in keys} == {dtype}  # the KV cache holds half-precision keys too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generates(saved, batch, dtype):
    model = AutoModelForCausalLM.from_pretrained(saved / "router", dtype=dtype)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (3, batch["input_ids"].shape[1] + 6)
    assert out.max() < model.config.vocab_size
    # The first new token is what the forward's last position prefers (positions counted, as generate counts
    # them, from each row's first unpadded token).
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        first = model(**batch, position_ids=positions).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, batch["input_ids"].shape[1]], first)


def test_auto_dtype_and_device_map_load_the_model_as_saved(saved, batch):
    expected = log_probs(AutoModelForCausalLM.from_pretrained(saved / "router", dtype=torch.float32), batch)
    model = AutoModelForCausalLM.from_pretrained(saved / "router", dtype="auto", device_map="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(log_probs(model, batch), expected)
    model = AutoModelForCausalLM.from_pretrained(saved / "router", dtype=torch.bfloat16, device_map="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (log_probs(model, batch) - expected).abs().max() < TOLERANCE[torch.bfloat16]


OFFLOADED_MERGE = {"saes": "disk", "latent_gates": "disk", "token_gates": "disk", "router": "disk", "sources": "cpu"}


@pytest.mark.parametrize("device_map", ["auto", OFFLOADED_MERGE], ids=["auto-half-in-memory", "merge-offloaded"])
def test_device_map_across_memory_and_disk_gives_the_same_model(saved, batch, tmp_path, device_map):
    """Device maps over two places (CPU memory and disk offload, the two this machine has): "auto" with half of the
    model's size in memory cuts a source between its blocks; a map that offloads the SAEs, gates and router leaves
    their weights on disk until each forward. Either way the logits and the greedy tokens are those of the model in
    memory, and no block is cut in two."""
    whole = AutoModelForCausalLM.from_pretrained(saved / "router")
    size = sum(p.numel() * p.element_size() for p in whole.parameters())
    model = AutoModelForCausalLM.from_pretrained(saved / "router", device_map=device_map,
                                                 max_memory={"cpu": size // 2}, offload_folder=str(tmp_path / "offload"))
    if device_map == "auto":
        cut = {device for key, device in model.hf_device_map.items() if key.startswith("sources.a.")}
        assert cut == {"cpu", "disk"}
        blocks = [name for name, m in model.named_modules() if type(m).__name__ in model._no_split_modules]
        assert blocks and not any(key.startswith(block + ".") for key in model.hf_device_map for block in blocks)
    else:
        assert all(p.device.type == "meta" for p in model.saes.parameters())  # on disk until a forward needs them
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, whole(**batch).logits)
    kwargs = dict(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(**kwargs), whole.generate(**kwargs))
