"""The bridges (sae, linear, cross_attention) on one interface: each changes the receiver, sees no future token,
generates with the cache as without it, saves and loads, and trains on next-token loss."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from saemerge import SAEMergedForCausalLM
from saemerge.calibrate import sae_regulariser, train_on_next_token_loss
from saemerge.modeling import OUTPUT_CACHE
from saemerge.recipe import LatentSpec

BRIDGES = ["sae", "linear", "cross_attention"]


def with_bridge(merged, bridge: str, seed: int = 0) -> SAEMergedForCausalLM:
    """The same sources and SAEs under another bridge, its parameters random (a trained-looking bridge: at their
    initial zeros the linear and cross-attention bridges bring nothing)."""
    config = copy.deepcopy(merged.config)
    config.bridge = bridge
    saes = [dict(site) for site in merged.bridge.saes]
    model = SAEMergedForCausalLM(config, sources=dict(merged.sources), saes=saes).eval()
    torch.manual_seed(seed)
    for p in model.bridge.calibration_parameters():
        p.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("kind", ["target", "router", "two_sites"])
def test_bridge_changes_the_receiver_and_never_reads_the_future(merges, batch, bridge, kind):
    model = with_bridge(merges[kind], bridge)
    ids = batch["input_ids"][:, -6:]  # unpadded
    with torch.no_grad():
        logits = model(ids).logits
        model.config.scale = 0.0
        alone = model(ids).logits
        model.config.scale = 1.0
        changed = ids.clone()
        changed[:, 3:] = (changed[:, 3:] + 7) % model.config.vocab_size
        after = model(changed).logits
    assert not torch.allclose(logits, alone, atol=1e-4)  # the bridge brings something in
    torch.testing.assert_close(after[:, :3], logits[:, :3], rtol=1e-5, atol=1e-5)  # tokens 3.. change nothing before
    assert not torch.allclose(after[:, 3:], logits[:, 3:], atol=1e-4)


@pytest.mark.parametrize("bridge", ["linear", "cross_attention"])
@pytest.mark.parametrize("kind", ["target", "router"])
def test_bridge_generates_with_the_cache_as_without(merges, batch, bridge, kind):
    model = with_bridge(merges[kind], bridge)
    kwargs = dict(**batch, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(**kwargs, use_cache=True)
    assert torch.equal(cached, model.generate(**kwargs, use_cache=False))
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    cache = getattr(out, OUTPUT_CACHE)
    assert ("bridge" in cache.caches) == (bridge == "cross_attention")
    if bridge == "cross_attention":  # keys and values of every position, one layer per sender, receiver and site
        assert len(cache.caches["bridge"].layers) == model.bridge.cache_layers() > 0
        assert cache.caches["bridge"].get_seq_length() == batch["input_ids"].shape[1]


def test_cross_attention_ignores_padding(merges, batch, zoo):
    """A left-padded prompt's logits at its real tokens are those of the prompt alone: padding is never attended."""
    model = with_bridge(merges["target"], "cross_attention")
    mask = batch["attention_mask"]
    row = int(mask.sum(1).argmin())  # the most padded row
    real = batch["input_ids"][row][mask[row].bool()][None]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate gives them: the sources' own positions match
    with torch.no_grad():
        padded = model(**batch, position_ids=positions).logits[row, -real.shape[1]:]
        alone = model(real).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bridge", ["linear", "cross_attention"])
def test_bridge_saves_and_loads(merges, batch, bridge, tmp_path):
    model = with_bridge(merges["two_sites"], bridge)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.bridge == bridge and type(loaded.bridge) is type(model.bridge)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("bridge", ["linear", "cross_attention"])
def test_bridge_trains_on_next_token_loss_with_the_sources_frozen(merges, batch, bridge):
    model = with_bridge(merges["target"], bridge)
    for p in model.bridge.calibration_parameters():  # from no exchange, as a fresh bridge starts
        p.data.zero_() if p.dim() > 1 and p.shape[0] == p.shape[1] else None
    sources = {k: v.clone() for k, v in model.sources.state_dict().items()}
    ids = batch["input_ids"][:, -6:]
    before = model(ids, labels=ids).loss.item()
    metrics = train_on_next_token_loss(model, model.calibration_parameters(), iter([ids] * 30), 30, 1e-2,
                                       progress=False)
    assert metrics["loss_last"] < before - 0.1
    assert all(torch.equal(v, model.sources.state_dict()[k]) for k, v in sources.items())


def test_sae_bridge_trains_end_to_end_with_its_losses_as_regulariser(merges, batch):
    """calibrate.saes: the SAEs move, only answer tokens carry the next-token loss, and the regulariser (the SAEs'
    reconstruction and alignment on the residuals the forward saw) is part of what is minimised."""
    model = with_bridge(merges["target"], "sae")
    latent = LatentSpec(size=model.config.latent["d_sae"], k=model.config.latent["k"])
    regulariser = sae_regulariser(model, latent)
    ids = batch["input_ids"][:, -6:]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    decoder = model.bridge.saes[0]["b"].W_dec.detach().clone()
    with torch.no_grad():
        model(ids)
    first = regulariser().item()
    assert first > 0 and all(not seen for seen in model.bridge.seen)  # read once, then cleared
    train_on_next_token_loss(model, model.calibration_parameters(saes=True), iter([(ids, labels)] * 20), 20, 1e-3,
                             progress=False, regulariser=regulariser)
    assert not model.bridge.record  # recording ends with training
    assert not torch.equal(decoder, model.bridge.saes[0]["b"].W_dec)
    model.bridge.record = True
    with torch.no_grad():
        model(ids)
    assert regulariser().item() < first  # random gates, trained SAEs: their own losses went down too


def test_sae_fine_tuning_needs_the_sae_bridge(zoo, tmp_path):
    from saemerge.errors import RecipeError
    from saemerge.recipe import parse_recipe
    from conftest import recipe_dict

    raw = recipe_dict(zoo["gpt2"], zoo["gpt2_b"], tmp_path / "out", merge__bridge="linear",
                      merge__calibrate={"steps": 1, "saes": True})
    with pytest.raises(RecipeError, match=r"merge.calibrate.saes: true with bridge 'linear'; expected bridge: sae"):
        parse_recipe(raw)
    raw["merge"]["bridge"] = "sae"
    assert parse_recipe(raw).merge.calibrate.saes


def test_receiver_training_moves_the_target_but_its_embeddings_and_saves(merges, batch, tmp_path):
    """calibrate.receiver: the target learns to read the bridge; its embeddings and every other source stay."""
    model = with_bridge(merges["target"], "cross_attention")
    target = model.config.target
    tables = [q for m in (model.get_input_embeddings(), model.get_output_embeddings()) for q in m.parameters()]
    embeddings = {n for n, p in model.target.named_parameters() if any(p is q for q in tables)}
    before = {k: v.clone() for k, v in model.sources.state_dict().items()}
    ids = batch["input_ids"][:, -6:]
    first = model(ids, labels=ids).loss.item()
    metrics = train_on_next_token_loss(model, model.calibration_parameters(receiver=True), iter([ids] * 20), 20, 1e-3,
                                       progress=False)
    assert metrics["loss_last"] < first - 0.1
    after = model.sources.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert moved and all(k.startswith(f"{target}.") for k in moved)
    assert embeddings and not moved & {f"{target}.{n}" for n in embeddings}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)


def test_receiver_training_needs_the_target_head_and_a_self_contained_folder(zoo, tmp_path):
    from saemerge.errors import RecipeError
    from saemerge.recipe import parse_recipe
    from conftest import recipe_dict

    raw = recipe_dict(zoo["gpt2"], zoo["gpt2_b"], tmp_path / "out", merge__bridge="cross_attention",
                      merge__heads="mean", merge__calibrate={"steps": 1, "receiver": True})
    with pytest.raises(RecipeError, match=r"merge.calibrate.receiver: true with heads 'mean'; expected heads: target"):
        parse_recipe(raw)
    raw["merge"]["heads"] = "target"
    raw["save"] = {"storage": "reference"}
    with pytest.raises(RecipeError, match=r"merge.calibrate.receiver: true with save.storage: reference; expected"):
        parse_recipe(raw)
    raw["save"] = {"storage": "self-contained"}
    assert parse_recipe(raw).merge.calibrate.receiver
