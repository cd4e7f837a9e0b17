"""Merged inference runs every source's blocks once per forward (lockstep.py), mixes heads a chunk of positions
at a time (heads.py) and gives logits only where asked (`logits_to_keep`)."""

import copy

import pytest
import torch

from saemerge import SAEMergedForCausalLM, heads
from saemerge.hooks import ResidualHook, find_blocks, run_to_layer
from saemerge.sae_bridge import scaled_residuals
from test_bridges import with_bridge

KINDS = ["target", "router", "two_sites"]


def block_calls(model: SAEMergedForCausalLM) -> tuple[dict, list]:
    """{source: [calls of block 0, 1, ...]}, counted by forward hooks (removed by the caller)."""
    calls, handles = {}, []
    for name, source in model.sources.items():
        _, blocks = find_blocks(source)
        calls[name] = [0] * len(blocks)
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(lambda *_, n=name, i=i: calls[n].__setitem__(i, calls[n][i] + 1)))
    return calls, handles


@pytest.mark.parametrize("bridge", ["sae", "linear", "cross_attention"])
@pytest.mark.parametrize("kind", KINDS + ["mean"])
def test_every_block_of_every_source_runs_once_per_forward(merges, batch, kind, bridge):
    model = with_bridge(merges["router" if kind == "mean" else kind], bridge)
    model.config.heads = "mean" if kind == "mean" else model.config.heads
    cfg = model.config
    calls, handles = block_calls(model)
    try:
        with torch.no_grad():
            cache = model.new_cache()
            for step in (batch["input_ids"], batch["input_ids"][:, -1:]):  # no cache, then a cached step
                for counts in calls.values():
                    counts[:] = [0] * len(counts)
                model(step, cache=cache if step.shape[1] == 1 else None)
                for name, counts in calls.items():
                    receives = cfg.heads != "target" or name == cfg.target
                    last = max(int(str(layer).split(".")[-1]) for layer in model.layers[name])
                    expected = [1] * len(counts) if receives else [int(i <= last) for i in range(len(counts))]
                    assert counts == expected, (name, step.shape)
                if step.shape[1] > 1:  # fill the cache for the cached step
                    model(step, cache=cache)
    finally:
        for handle in handles:
            handle.remove()


def test_router_forward_equals_the_sources_run_by_hand(merges, batch):
    """The lockstep forward against the merge written out: each source's residual at its layer, codes through the
    bridge, each source run whole with its delta added there, heads mixed by the router's weights."""
    model, ids = merges["router"], batch["input_ids"]
    cfg = model.config
    with torch.no_grad():
        residuals = {n: run_to_layer(model.sources[n], model.layers[n][0], ids) for n in cfg.names}
        sent = model.bridge.send(0, residuals)
        logits = {}
        for n in cfg.names:
            delta = cfg.scale * model.bridge.receive(n, 0, residuals[n], sent, residuals)
            with ResidualHook(model.sources[n], model.layers[n][0], "inject", vector=delta):
                logits[n] = model.sources[n](ids).logits
        weights = model.router(scaled_residuals(model.saes[0], cfg.names, residuals, model.router)).log_softmax(-1)
        probs = sum(weights[..., i, None].exp() * logits[n].softmax(-1) for i, n in enumerate(cfg.names))
        torch.testing.assert_close(model(ids).logits, probs.log(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS + ["mean"])
def test_logits_to_keep_gives_those_positions_only(merges, batch, kind):
    model = copy.copy(merges["router" if kind == "mean" else kind])
    model.config = copy.deepcopy(model.config)
    if kind == "mean":
        model.config.heads = "mean"
    with torch.no_grad():
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
        picked = model(**batch, logits_to_keep=torch.tensor([0, 2, 5])).logits
    assert last.shape == (full.shape[0], 1, full.shape[2])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(picked, full[:, [0, 2, 5]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["target", "router"])
def test_heads_and_loss_a_few_positions_at_a_time_equal_all_at_once(merges, batch, kind, monkeypatch):
    model = merges[kind]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        whole = model(**batch, labels=labels)
        monkeypatch.setattr(heads, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)  # one position of one row at a time
        chunked = model(**batch, labels=labels)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.loss, whole.loss)
    expected = torch.nn.functional.cross_entropy(whole.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
    torch.testing.assert_close(whole.loss, expected)


def test_a_head_its_family_transforms_is_applied_as_its_forward_applies_it(zoo):
    """Gemma's final soft-capping, applied outside the model's forward, gives the model's own logits; a head that
    forgot it is refused rather than mixed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo["gemma3_text"])
    model.config.final_logit_softcapping = 3.0
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        head = heads.OutputHead(model)
        torch.testing.assert_close(head(hidden), out.logits)
        head.check(hidden, out.logits)
        forgetful = heads.OutputHead(model)
        forgetful.softcap = None
        with pytest.raises(ValueError, match="heads 'target' can"):
            forgetful.check(hidden, out.logits)

