"""Every way a recipe names a source: a folder, a GGUF file, a LoRA adapter on top, a device map; and the
one-line reasons a source cannot load."""

import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from saemerge import RecipeError, load_source, merge, parse_recipe, validate
from saemerge.recipe import SourceSpec
from conftest import recipe_dict, write_gguf

IDS = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def gguf_source(tokenizer, tmp_path_factory):
    """(the model, its folder with the model written as GGUF and as safetensors)."""
    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)  # transformers maps GGUF's context_length to n_ctx, so keep GPT-2's default n_positions
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=3, n_embd=32, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    write_gguf(model, tokenizer, root / "tiny.gguf")
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return model, root


def test_gguf_source_loads_the_same_weights(gguf_source, tmp_path):
    model, root = gguf_source
    source = load_source(SourceSpec(name="g", model=str(root), gguf_file="tiny.gguf", layer=1))
    assert torch.equal(logits(source), logits(model))
    # Dequantized for good: it saves as plain safetensors, as any source does.
    source.save_pretrained(tmp_path / "saved")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), logits(model))


def test_merge_of_a_gguf_source_saves_and_reloads(gguf_source, zoo, tmp_path):
    model, root = gguf_source
    raw = recipe_dict(root, zoo["gpt2"], tmp_path / "out", train__eval_tokens=256, data__tokens=1024)
    raw["models"][0]["gguf_file"] = "tiny.gguf"
    out = merge(parse_recipe(raw), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    assert torch.equal(logits(reloaded.sources["a"]), logits(model))


def test_lora_adapter_is_applied_and_merged(zoo, lora):
    folder, peft_model = lora
    source = load_source(SourceSpec(name="l", model=str(zoo["llama"]), adapter=str(folder), layer=1))
    base = load_source(SourceSpec(name="l", model=str(zoo["llama"]), layer=1))
    assert not isinstance(source, PeftModel) and type(source) is type(base)
    torch.testing.assert_close(logits(source), logits(peft_model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(source), logits(base), atol=1e-3)


def test_device_map_loads_through_accelerate(zoo):
    spec = SourceSpec(name="l", model=str(zoo["llama"]), layer=1, device_map="auto")
    source = load_source(spec)
    assert source.device.type == "cpu"  # one device here: everything lands on it
    assert torch.equal(logits(source), logits(load_source(SourceSpec(name="l", model=str(zoo["llama"]), layer=1))))


def expect_errors(raw, *expected):
    with pytest.raises(RecipeError) as e:
        validate(parse_recipe(raw))
    for line in expected:
        assert any(line in got for got in e.value.lines), (line, e.value.lines)


def test_sources_that_cannot_load_get_one_line_each(zoo, lora, gguf_source, tokenizer, tmp_path):
    folder, _ = lora
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    _, root = gguf_source
    unsupported = tmp_path / "odd"
    write_gguf(GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=8, n_head=2)), tokenizer,
               unsupported / "odd.gguf", architecture="rwkv6")
    raw = recipe_dict(zoo["qwen2"], zoo["gpt2"], tmp_path / "out")
    raw["models"][0]["adapter"] = str(folder)  # a Llama adapter on Qwen2: same module names, other widths
    raw["models"][1]["adapter"] = str(folder)  # on GPT-2: no such modules
    raw["models"] += [{"name": "c", "model": str(zoo["llama"]), "adapter": str(pickled), "layer": 1},
                      {"name": "d", "model": str(zoo["llama"]), "adapter": str(tmp_path / "none"), "layer": 1},
                      {"name": "e", "model": str(root), "gguf_file": "missing.gguf", "layer": 1},
                      {"name": "f", "model": str(unsupported), "gguf_file": "odd.gguf", "layer": 0}]
    expect_errors(
        raw,
        "models.0.adapter: 'model.layers.0.mlp.down_proj' has 96 features in the adapter and 64 in",
        "models.1.adapter: adapts 'model.layers.0.mlp.down_proj', which",
        "models.2.adapter: '" + str(pickled) + "' holds adapter_model.bin, a pickle (loading it can run code); "
        "expected adapter_model.safetensors — convert it, or pass --allow-pickle if you trust the file",
        f"models.3.adapter: folder '{tmp_path / 'none'}' does not exist",
        f"models.4.gguf_file: '{root / 'missing.gguf'}' does not exist",
        f"models.5.model: cannot load '{unsupported}' as a causal LM: ",  # then transformers' words: not pinned
    )
