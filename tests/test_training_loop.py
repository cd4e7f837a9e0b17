"""The training loop's invariants (decoder norm and gradient, dead-latent restarts, schedules), the harvested
activations, and end-to-end runs of the default latent settings and of ReLU + L1."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import saemerge
from saemerge import SAEConfig, SparseAutoencoder, parse_recipe, resolve_layer
from saemerge.harvest import activations
from saemerge.recipe import LatentSpec, TrainSpec
from saemerge.train import Trainer, lr_factor, new_sae, resample_dead, resampling_due
from conftest import recipe_dict

IDS = torch.randint(1, 300, (3, 10), generator=torch.Generator().manual_seed(2))


def two_source_trainer(steps=10, resample_every=0):
    """A Trainer of two randomly started SAEs (widths 8 and 12, 16 latents) and one batch of 64 tokens."""
    g = torch.Generator().manual_seed(0)
    latent = LatentSpec(size=16, activation="relu", l1=1e-3, align=1.0, cross=0.5)
    saes = {"a": new_sae(latent, 8), "b": new_sae(latent, 12)}
    for sae in saes.values():
        sae.init_random(g)
    batch = [{"a": torch.randn(64, 8, generator=g) + 1, "b": torch.randn(64, 12, generator=g) * 3}]
    train = TrainSpec(lr=1e-2, resample_every=resample_every, device="cpu")
    return Trainer([saes], latent, train, steps, torch.device("cpu"), g), saes, batch


def test_a_step_keeps_decoder_rows_unit_norm_and_their_gradient_orthogonal():
    """After Trainer.step the rows have norm 1, and the W_dec gradient the step used has no component along the
    rows it started from (remove_parallel_grads ran before Adam)."""
    trainer, saes, batch = two_source_trainer()
    before = {n: sae.W_dec.detach().clone() for n, sae in saes.items()}
    trainer.step(batch, 0)
    for n, sae in saes.items():
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(16))
        assert not torch.allclose(sae.W_dec, before[n])
        grad = sae.W_dec.grad
        assert grad.norm(dim=-1).min() > 0
        along = (grad * before[n]).sum(-1) / grad.norm(dim=-1)
        assert along.abs().max() < 1e-5, n
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(1, 10))


def test_remove_parallel_grads_by_hand():
    """Each gradient row loses its component along its (unit) decoder row and keeps the rest."""
    sae = SparseAutoencoder(SAEConfig(d_in=2, d_sae=2))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    sae.W_dec.grad = torch.tensor([[2.0, 3.0], [1.0, 1.0]])
    sae.remove_parallel_grads()
    # row 1: (1, 1) - 1.4 * (0.6, 0.8) = (0.16, -0.12)
    torch.testing.assert_close(sae.W_dec.grad, torch.tensor([[0.0, 3.0], [0.16, -0.12]]))


@pytest.mark.parametrize("activation, encoder_share", [("relu", 0.2), ("topk", 1.0)])
def test_resampling_restarts_dead_latents_on_the_same_tokens_and_forgets_their_adam_moments(activation,
                                                                                             encoder_share):
    """Restarted latents: decoder rows = normalised errors of tokens chosen once for every source, encoder columns
    along them at `encoder_share` x the mean live column norm, b_enc 0, Adam moments zeroed (only theirs)."""
    torch.manual_seed(0)
    x = {"a": torch.randn(200, 8), "b": torch.randn(200, 12) * 3}
    cfg = dict(d_sae=32, activation=activation, k=4)
    saes = {n: SparseAutoencoder(SAEConfig(d_in=v.shape[1], **cfg)) for n, v in x.items()}
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7, 11]] = True
    params = [p for sae in saes.values() for p in sae.parameters()]
    optimizer = torch.optim.Adam(params)
    sum(((p * torch.randn_like(p)).sum() for p in params)).backward()
    optimizer.step()  # every moment is now non-zero
    for n, sae in saes.items():
        sae.init_from_data(x[n], torch.arange(32))
        with torch.no_grad():
            sae.b_enc[dead] = -1e6  # these latents can never fire
        assert not (sae.encode(x[n])[:, dead] > 0).any()
    with torch.no_grad():  # in each SAE's normalised units, by hand
        errors = {}
        for n, sae in saes.items():
            pre = (x[n] / sae.act_scale - sae.b_dec) @ sae.W_enc + sae.b_enc
            z = pre.clamp_min(0)
            if activation == "topk":
                z = torch.where(pre >= pre.sort(-1, descending=True).values[:, 3:4], z, 0.0)
            errors[n] = x[n] / sae.act_scale - (z @ sae.W_dec + sae.b_dec)
    live_norm = {n: sae.W_enc[:, ~dead].norm(dim=0).mean().item() for n, sae in saes.items()}
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}

    assert resample_dead(saes, x, dead, optimizer, torch.Generator().manual_seed(0)) == 3

    tokens = {}
    for n, sae in saes.items():
        unit_errors = errors[n] / errors[n].norm(dim=-1, keepdim=True)
        tokens[n] = (sae.W_dec[dead] @ unit_errors.T).argmax(-1)  # the token whose error each new row is
        torch.testing.assert_close(sae.W_dec[dead], unit_errors[tokens[n]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.W_enc[:, dead], (encoder_share * live_norm[n] * sae.W_dec[dead]).T)
        assert (sae.b_enc[dead] == 0).all()
        if activation == "relu":
            assert (sae.encode(x[n])[:, dead] > 0).any(0).all()  # every restarted latent fires again
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            for key, old in moments[id(p)].items():
                new = optimizer.state[p][key]
                if key == "step" or p is sae.b_dec:
                    assert torch.equal(new, old), (n, key)
                    continue
                mine, others = (new[:, dead], new[:, ~dead]) if p is sae.W_enc else (new[dead], new[~dead])
                kept = old[:, ~dead] if p is sae.W_enc else old[~dead]
                assert (mine == 0).all() and torch.equal(others, kept), (n, key)
    assert torch.equal(tokens["a"], tokens["b"])


def test_resampling_schedule():
    """Every `every` steps, never at step 0, never at or after 80% of the steps, never with every = 0."""
    assert [s for s in range(100) if resampling_due(s, 100, 20)] == [20, 40, 60]  # not 80 = 0.8 * steps
    assert [s for s in range(100) if resampling_due(s, 100, 25)] == [25, 50, 75]
    assert [s for s in range(11) if resampling_due(s, 11, 3)] == [3, 6]  # 9 > 0.8 * 11
    assert not any(resampling_due(s, 100, 0) for s in range(100))


def test_trainer_resamples_exactly_when_due():
    """Trainer.step restarts dead latents at steps 2, 4 and 6 of 10 (every 2) and at no other step."""
    trainer, _, batch = two_source_trainer(steps=10, resample_every=2)
    restarted = []
    for step in range(10):
        trainer.fired[0].zero_()  # as if no latent had fired since the last resampling: all 16 are dead
        before = trainer.resampled
        trainer.step(batch, step)
        restarted.append(trainer.resampled - before)
    assert restarted == [0, 0, 16, 0, 16, 0, 16, 0, 0, 0]


def test_learning_rate_factor():
    """Cosine decay of the learning rate from 1 at step 0 to 0.1 at the end."""
    assert lr_factor(0, 100) == pytest.approx(1.0)
    assert lr_factor(50, 100) == pytest.approx(0.55)
    assert lr_factor(25, 100) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert lr_factor(100, 100) == pytest.approx(0.1)
    factors = [lr_factor(s, 100) for s in range(101)]
    assert all(a > b for a, b in zip(factors, factors[1:]))


def test_harvested_activations_leave_out_position_0(zoo):
    """Rows of `activations` = hidden_states[layer + 1][:, 1:] flattened, for every source and site."""
    sources = {"a": AutoModelForCausalLM.from_pretrained(zoo["gpt2"]).eval(),
               "b": AutoModelForCausalLM.from_pretrained(zoo["llama"]).eval()}
    paths = {n: [resolve_layer(m, 0), resolve_layer(m, 1)] for n, m in sources.items()}
    sites = activations(sources, paths, IDS)
    assert len(sites) == 2
    for name, model in sources.items():
        with torch.no_grad():
            hidden = model(IDS, output_hidden_states=True).hidden_states
        for layer, site in enumerate(sites):
            expected = hidden[layer + 1][:, 1:].reshape(3 * 9, -1)
            torch.testing.assert_close(site[name], expected, rtol=1e-5, atol=1e-5)


# --- end to end ----------------------------------------------------------------------------------------------------
def run_merge(zoo, root, latent: dict, steps: int):
    """A merge of two zoo sources with these latent settings (the rest default); its SAE metrics and training log."""
    raw = recipe_dict(zoo["gpt2"], zoo["llama"], root / "out", data__tokens=steps * 512, train__log_every=1)
    raw["latent"] = latent
    out = saemerge.merge(parse_recipe(raw), progress=False, evaluate_after=False)
    metrics = json.loads((out / "metrics.json").read_text())["sites"][0]["sources"]
    return metrics, [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]


def test_default_latent_settings_reconstruct_sparsely_and_learn(zoo, tmp_path):
    """The recipe's default latent settings (topk, k 32, no penalty, align 1): codes of at most k latents that
    explain variance on each source, and a training FVU that falls."""
    assert (LatentSpec(size=256).activation, LatentSpec(size=256).k, LatentSpec(size=256).l1) == ("topk", 32, 0.0)
    metrics, log = run_merge(zoo, tmp_path, {"size": 256}, steps=16)
    for name, source in metrics.items():
        assert source["explained_variance"] > 0.5 and source["l0"] <= 32, (name, source)
    assert len(log) == 16 and all(row["sparsity"] == 0 for row in log)
    assert log[-1]["recon"] < log[0]["recon"] - 0.05


def test_relu_codes_are_made_sparse_by_l1(zoo, tmp_path):
    """ReLU + L1 end to end: the sparsity term is logged and L1 cuts the active latents to under half of what the
    same run without it keeps, while still explaining variance."""
    relu = {"size": 64, "activation": "relu"}
    dense, _ = run_merge(zoo, tmp_path / "l1-0", {**relu, "l1": 0.0}, steps=64)
    sparse, log = run_merge(zoo, tmp_path / "l1", {**relu, "l1": 0.1}, steps=64)
    assert all(row["sparsity"] > 0 for row in log)
    for name in dense:
        assert sparse[name]["l0"] < 0.5 * dense[name]["l0"], (name, sparse[name]["l0"], dense[name]["l0"])
        assert sparse[name]["explained_variance"] > 0.05, (name, sparse[name])
