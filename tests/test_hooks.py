import pytest
import torch

from saemerge import ResidualHook, SAEConfig, SparseAutoencoder, find_blocks, resolve_layer, run_to_layer
from conftest import BLOCK_PATHS, FAMILIES, make_model

IDS = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, make_model(request.param, 400)


def hooks(model):
    # transformers installs output-capturing hooks of its own on first use; ours must come and go without trace
    return {name: list(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}


def test_finds_the_decoder_blocks(family_model):
    family, model = family_model
    path, blocks = find_blocks(model)
    assert path == BLOCK_PATHS[family]
    assert len(blocks) == 3
    assert resolve_layer(model, 2) == f"{path}.2"
    assert resolve_layer(model, f"{path}.1") == f"{path}.1"  # a module path is taken as it is


def test_layer_i_is_hidden_states_i_plus_1(family_model):
    _, model = family_model
    with torch.no_grad():
        hidden_states = model(IDS, output_hidden_states=True).hidden_states
    for i in range(2):  # the last entry of hidden_states has the final norm applied; block outputs do not
        torch.testing.assert_close(run_to_layer(model, i, IDS), hidden_states[i + 1], rtol=0, atol=0)


def test_run_to_layer_stops_early(family_model):
    _, model = family_model
    calls, before = [], hooks(model)
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    run_to_layer(model, 0, IDS)
    handle.remove()
    assert calls == [] and hooks(model) == before


def test_modes_change_the_output_and_detach_restores(family_model):
    _, model = family_model
    before = hooks(model)
    with torch.no_grad():
        clean = model(IDS).logits
        d = model.config.get_text_config().hidden_size
        with ResidualHook(model, 1, "inject", vector=torch.zeros(d)):
            zero = model(IDS).logits
        with ResidualHook(model, 1, "inject", vector=lambda h: torch.ones_like(h)):
            pushed = model(IDS).logits
        with ResidualHook(model, 1, "replace", sae=SparseAutoencoder(SAEConfig(d_in=d, d_sae=16))):
            replaced = model(IDS).logits
        with ResidualHook(model, 1, "capture") as hook:
            captured = model(IDS).logits
        after = model(IDS).logits
    assert torch.equal(zero, clean) and torch.equal(captured, clean) and torch.equal(after, clean)
    assert not torch.allclose(pushed, clean) and not torch.allclose(replaced, clean)
    assert hook.captured.shape == (2, 12, d)
    assert hooks(model) == before


def test_bad_layers_are_refused():
    model = make_model("gpt2", 400)
    with pytest.raises(ValueError, match="out of range; expected 0..2"):
        resolve_layer(model, 3)
    with pytest.raises(ValueError, match="no module 'transformer.nope'"):
        resolve_layer(model, "transformer.nope")
