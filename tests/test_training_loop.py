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
from saemerge.train import Trainer, init_batches, init_saes, lr_factor, new_sae, resample_dead, resampling_due
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


def test_resampling_picks_tokens_by_their_error_in_each_sae_s_units():
    """The worst-reconstructed token is chosen by its error in each SAE's normalised units: a big raw error in a
    source of big activations counts less than a small one in a source of small activations."""
    saes = {n: SparseAutoencoder(SAEConfig(d_in=2, d_sae=4)) for n in ("big", "small")}
    for sae in saes.values():
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.b_enc.fill_(-1.0)  # no latent fires: each token's error is the token itself (b_dec = 0)
    saes["big"].act_scale.fill_(1000.0)
    saes["small"].act_scale.fill_(0.001)
    x = {"big": torch.tensor([[50.0, 0.0], [0.0, 0.0]]), "small": torch.tensor([[0.0, 0.0], [0.0, 0.05]])}
    optimizer = torch.optim.Adam([p for sae in saes.values() for p in sae.parameters()])
    dead = torch.tensor([True, False, False, False])
    assert resample_dead(saes, x, dead, optimizer, torch.Generator().manual_seed(0)) == 1
    # token 1 (0.05 / 0.001 = 50 units in `small`) beats token 0 (50 / 1000 = 0.05 units in `big`)
    torch.testing.assert_close(saes["small"].W_dec[0], torch.tensor([0.0, 1.0]))


def test_resampling_weighs_every_dimension_of_every_source():
    """A token's badness is its squared error summed over each source's dimensions (a wide source's small
    per-dimension error can outweigh a narrow source's larger one)."""
    saes = {"wide": SparseAutoencoder(SAEConfig(d_in=10_000, d_sae=2)), "narrow": SparseAutoencoder(SAEConfig(d_in=1, d_sae=2))}
    for sae in saes.values():
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.b_enc.fill_(-1.0)
    x = {"wide": torch.zeros(2, 10_000), "narrow": torch.tensor([[0.0], [10.0]])}
    x["wide"][0] = 1.0  # token 0: 10,000 in sum (1 per dimension); token 1: 100 (100 per dimension)
    optimizer = torch.optim.Adam([p for sae in saes.values() for p in sae.parameters()])
    resample_dead(saes, x, torch.tensor([True, False]), optimizer, torch.Generator().manual_seed(0))
    assert saes["wide"].W_dec[0].abs().sum() > 1  # restarted on token 0: its wide error, not token 1's zero one


def test_first_batches_cover_every_latent_with_its_own_token():
    assert init_batches(LatentSpec(size=100), tokens_per_batch=30) == 4
    assert init_batches(LatentSpec(size=90), tokens_per_batch=30) == 3
    assert init_batches(LatentSpec(size=100, init="random"), tokens_per_batch=30) == 1


def test_init_saes_start_every_site_aligned_on_the_same_tokens(tmp_path):
    """With init: data, latent j of every source starts as the same token (its scaled, centred activation), at
    every site; a source given an SAE file starts as that SAE instead (the same function of its input)."""
    g = torch.Generator().manual_seed(4)
    first = [[{"a": torch.randn(10, 3, generator=g) + 2, "b": torch.randn(10, 5, generator=g) * 4}
              for _ in range(2)] for _ in range(2)]  # 2 batches x 2 sites
    latent = LatentSpec(size=12, activation="relu")
    saes = init_saes(latent, first, {}, torch.Generator().manual_seed(0))
    assert len(saes) == 2 and all(list(site) == ["a", "b"] for site in saes)
    for site in range(2):
        chosen = {}
        for n, sae in saes[site].items():
            x = torch.cat([batch[site][n] for batch in first]) / sae.act_scale
            centred = (x - x.mean(0)) / (x - x.mean(0)).norm(dim=-1, keepdim=True)
            match = sae.W_dec @ centred.T  # 1 where row j is token t
            assert torch.allclose(match.max(-1).values, torch.ones(12), atol=1e-5)
            chosen[n] = match.argmax(-1)
        assert torch.equal(chosen["a"], chosen["b"]) and len(set(chosen["a"].tolist())) == 12

    file_sae = SparseAutoencoder(SAEConfig(d_in=5, d_sae=12))
    file_sae.init_from_data(torch.randn(40, 5) * 3, torch.arange(12))
    file_sae.save(tmp_path / "b0")
    file_sae.save(tmp_path / "b1")
    started = init_saes(latent, first, {"b": [str(tmp_path / "b0"), str(tmp_path / "b1")]},
                        torch.Generator().manual_seed(0))
    x = torch.cat([batch[1]["b"] for batch in first])
    with torch.no_grad():
        torch.testing.assert_close(started[1]["b"](x), file_sae(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(started[1]["a"].W_dec, saes[1]["a"].W_dec)  # the other source as before


def test_resampling_schedule():
    """Every `every` steps, never at step 0, never at or after 80% of the steps, never with every = 0."""
    assert [s for s in range(100) if resampling_due(s, 100, 20)] == [20, 40, 60]  # not 80 = 0.8 * steps
    assert [s for s in range(100) if resampling_due(s, 100, 25)] == [25, 50, 75]
    assert [s for s in range(11) if resampling_due(s, 11, 3)] == [3, 6]  # 9 > 0.8 * 11
    assert not any(resampling_due(s, 100, 0) for s in range(100))
    assert [s for s in range(5) if resampling_due(s, 5, 1)] == [1, 2, 3]


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


def test_fired_restarts_at_each_resampling_and_marks_the_step_s_codes():
    """After a resampling step, `fired` holds exactly the latents active in that step's codes (what fired before
    is forgotten); the step counts its tokens."""
    trainer, saes, batch = two_source_trainer(steps=10, resample_every=2)
    trainer.fired[0].fill_(True)  # everything fired: nothing to restart, but the record starts again
    with torch.no_grad():
        for sae in saes.values():
            sae.b_enc[:4] = -1e3  # latents 0-3 cannot fire in this step
        active = torch.stack([(saes[n].encode(batch[0][n]) > 0).any(0) for n in saes]).any(0)
    assert not active.all()  # else the check below could not tell
    trainer.step(batch, 2)
    assert trainer.resampled == 0 and torch.equal(trainer.fired[0], active)
    assert trainer.tokens_per_step == 64


def test_each_step_uses_its_own_gradient():
    """The second step's gradient is that of the second step's loss alone (nothing left over from the first)."""
    trainer, saes, batch = two_source_trainer()
    trainer.step(batch, 0)
    copies = {n: SparseAutoencoder(sae.cfg) for n, sae in saes.items()}
    for n, sae in copies.items():
        sae.load_state_dict(saes[n].state_dict())
    saemerge.losses.loss_terms(trainer.latent, copies, batch[0])["total"].backward()
    for sae in copies.values():
        sae.remove_parallel_grads()
    trainer.step(batch, 1)
    for n in saes:
        torch.testing.assert_close(saes[n].W_enc.grad, copies[n].W_enc.grad, rtol=1e-5, atol=1e-6)


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
