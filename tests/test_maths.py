"""The maths of the SAE metrics, the training loss and the merged model's starting gates, each checked against an
answer computed here by hand (plain formulas and loops on small float64 tensors), not by the code under test."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from saemerge import SAEConfig, SparseAutoencoder, measure, merged_model, resolve_layer
from saemerge.losses import cosine, loss_terms
from saemerge.recipe import LatentSpec, MergeSpec
from saemerge.train import new_sae

IDS = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(3))


def hand_sae(W_enc, W_dec, b_enc, b_dec, act_scale=1.0, activation="relu", k=1):
    """A float64 SAE with the given weights."""
    W_enc = torch.as_tensor(W_enc, dtype=torch.float64)
    sae = SparseAutoencoder(SAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], activation=activation, k=k)).double()
    with torch.no_grad():
        for name, value in dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec).items():
            getattr(sae, name).copy_(torch.as_tensor(value, dtype=torch.float64))
        sae.act_scale.fill_(act_scale)
    return sae


def random_sae(d_in, d_sae, seed, offset, act_scale, **kwargs):
    """Random weights; latent 0 always fires (so no code is all zero), and b_dec sits at the data's mean."""
    g = torch.Generator().manual_seed(seed)
    b_enc = torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.3
    b_enc[0] = 50.0
    return hand_sae(torch.randn(d_in, d_sae, generator=g, dtype=torch.float64),
                    torch.randn(d_sae, d_in, generator=g, dtype=torch.float64), b_enc,
                    torch.full((d_in,), offset / act_scale, dtype=torch.float64), act_scale, **kwargs)


def data(d_in, tokens, seed, offset):
    return torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + offset


# --- the independent computation -----------------------------------------------------------------------------
def codes_by_hand(sae, x):
    """relu((x / scale - b_dec) W_enc + b_enc); for TopK only each token's k largest are kept."""
    pre = (x / sae.act_scale - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = pre.clamp_min(0)
    if sae.cfg.activation == "topk":
        kth_largest = pre.sort(dim=-1, descending=True).values[:, sae.cfg.k - 1:sae.cfg.k]
        z = torch.where(pre >= kth_largest, z, 0.0)
    return z


def decode_by_hand(sae, z):
    return (z @ sae.W_dec + sae.b_dec) * sae.act_scale


def fvu_by_hand(x, recon):
    """Squared error over the sum of squares around the MEAN."""
    return ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def cos_by_hand(u, v):
    return (u @ v) / (u.norm() * v.norm())


def terms_by_hand(latent, saes, acts):
    names = list(acts)
    z = {n: codes_by_hand(saes[n], acts[n]) for n in names}
    tokens = len(acts[names[0]])
    recon = sum(fvu_by_hand(acts[n], decode_by_hand(saes[n], z[n])) for n in names)
    sparsity = sum(latent.l1 * z[n].abs().sum() + latent.l2 * (z[n] ** 2).sum() for n in names) / tokens
    unordered = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    align = sum(sum(1 - cos_by_hand(z[a][t], z[b][t]) for t in range(tokens)) / tokens
                for a, b in unordered) / len(unordered)
    ordered = [(a, b) for a in names for b in names if a != b]
    cross = sum(fvu_by_hand(acts[b], decode_by_hand(saes[b], z[a])) for a, b in ordered) / len(ordered)
    return {"recon": recon, "sparsity": sparsity, "align": align, "cross": cross}


# --- metrics ---------------------------------------------------------------------------------------------------
def test_explained_variance_by_hand():
    """EV = 1 - SSE / sum of squares around the mean: x = 2, 4, 6 reconstructed as 1, 2, 3 gives 1 - 14/8."""
    sae = hand_sae([[1.0]], [[0.5]], [0.0], [0.0])
    x = torch.tensor([[2.0], [4.0], [6.0]], dtype=torch.float64)
    out = measure({"a": sae}, [{"a": x[:2]}, {"a": x[2:]}])["sources"]["a"]
    assert out["explained_variance"] == pytest.approx(1 - 14 / 8)  # not 1 - 14/56 (the uncentred second moment)
    assert out["l0"] == 1 and out["dead_fraction"] == 0


def test_every_metric_over_several_batches_equals_the_whole_by_hand():
    """All source and pair metrics of `measure`, accumulated over uneven batches, equal formulas on all tokens."""
    widths, offsets, scales = {"a": 3, "b": 4, "c": 2}, {"a": 5.0, "b": -3.0, "c": 1.0}, {"a": 2.0, "b": 0.5, "c": 1.0}
    saes = {n: random_sae(d, 6, seed=i, offset=offsets[n], act_scale=scales[n])
            for i, (n, d) in enumerate(widths.items())}
    with torch.no_grad():
        saes["a"].b_enc[[4, 5]] = -1e3  # dead in a: dead fraction 2/6
        saes["b"].b_enc[5] = -1e3  # dead in b: 1/6
    x = {n: data(d, 30, seed=10 + i, offset=offsets[n]) for i, (n, d) in enumerate(widths.items())}
    batches = [{n: v[i:j] for n, v in x.items()} for i, j in [(0, 7), (7, 17), (17, 30)]]
    out = measure(saes, batches)
    assert out["tokens"] == 30

    z = {n: codes_by_hand(saes[n], x[n]) for n in saes}
    for n in saes:
        active = z[n] > 0
        expected = {"explained_variance": 1 - fvu_by_hand(x[n], decode_by_hand(saes[n], z[n])).item(),
                    "l0": active.sum().item() / 30,
                    "dead_fraction": sum(not active[:, j].any() for j in range(6)) / 6}
        assert out["sources"][n] == pytest.approx(expected, rel=1e-6), n  # dead_fraction is float32
    assert out["sources"]["a"]["dead_fraction"] == pytest.approx(2 / 6)
    assert out["sources"]["b"]["dead_fraction"] == pytest.approx(1 / 6)

    assert set(out["pairs"]) == {"a->b", "b->a", "a->c", "c->a", "b->c", "c->b"}  # every ordered pair
    for a, b in itertools.permutations(saes, 2):
        jaccard = 0.0
        for t in range(30):
            in_a = {j for j in range(6) if z[a][t, j] > 0}
            in_b = {j for j in range(6) if z[b][t, j] > 0}
            jaccard += len(in_a & in_b) / len(in_a | in_b)
        expected = {"cross_explained_variance": 1 - fvu_by_hand(x[b], decode_by_hand(saes[b], z[a])).item(),
                    "code_cosine": sum(cos_by_hand(z[a][t], z[b][t]).item() for t in range(30)) / 30,
                    "active_jaccard": jaccard / 30}
        assert out["pairs"][f"{a}->{b}"] == pytest.approx(expected, rel=1e-6), (a, b)
    assert out["pairs"]["a->b"]["active_jaccard"] < 0.9  # the check above can tell overlap from union / union


def test_small_codes_fire_and_a_token_active_nowhere_has_jaccard_zero():
    """A latent whose codes stay below 1 still counts as firing; a token with no active latent in either source
    adds 0 to the Jaccard mean (not 0/0)."""
    sae = hand_sae([[0.5, 0.0]], [[1.0], [1.0]], [0.0, 0.0], [0.0])  # latent 0 = x / 2 where positive; 1 never
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    out = measure({"a": sae, "b": sae}, [{"a": x, "b": x}])
    assert out["sources"]["a"]["dead_fraction"] == 0.5 and out["sources"]["a"]["l0"] == 0.5
    assert out["pairs"]["a->b"]["active_jaccard"] == 0.5


# --- loss terms --------------------------------------------------------------------------------------------------
@pytest.fixture
def three_sources():
    """Three float64 SAEs of different widths sharing 6 latents, and 20 tokens of activations for each."""
    widths, offsets, scales = {"a": 3, "b": 4, "c": 5}, {"a": 4.0, "b": -2.0, "c": 0.5}, {"a": 1.5, "b": 0.7, "c": 1.0}
    saes = {n: random_sae(d, 6, seed=20 + i, offset=offsets[n], act_scale=scales[n])
            for i, (n, d) in enumerate(widths.items())}
    acts = {n: data(d, 20, seed=30 + i, offset=offsets[n]) for i, (n, d) in enumerate(widths.items())}
    return saes, acts


def only(**weights):
    """A LatentSpec with every loss weight 0 except those given."""
    return LatentSpec(size=6, activation="relu", **{"l1": 0.0, "l2": 0.0, "align": 0.0, "cross": 0.0, **weights})


def test_recon_is_the_sum_of_the_sources_fvus(three_sources):
    """recon = sum over sources of SSE / sum of squares around the mean; with no other weight, total = recon."""
    saes, acts = three_sources
    parts = loss_terms(only(), saes, acts)
    expected = terms_by_hand(only(), saes, acts)["recon"]
    assert parts["recon"].item() == pytest.approx(expected.item(), rel=1e-10)
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("weights", [{"l1": 0.3}, {"l2": 0.7}], ids=["l1", "l2"])
def test_sparsity_is_l1_plus_l2_per_token(three_sources, weights):
    """sparsity = (l1 sum |z| + l2 sum z^2) / tokens, summed over sources, and it enters the total."""
    saes, acts = three_sources
    latent = only(**weights)
    parts = loss_terms(latent, saes, acts)
    expected = terms_by_hand(latent, saes, acts)
    assert parts["sparsity"].item() == pytest.approx(expected["sparsity"].item(), rel=1e-10)
    assert parts["sparsity"].item() > 0.01
    assert parts["total"].item() == pytest.approx((expected["recon"] + expected["sparsity"]).item(), rel=1e-10)


def test_align_is_the_mean_over_unordered_pairs_of_mean_one_minus_cosine(three_sources):
    """align = mean over the 3 unordered pairs of the mean over tokens of (1 - cos(z_a, z_b))."""
    saes, acts = three_sources
    parts = loss_terms(only(align=1.0), saes, acts)
    assert parts["align"].item() == pytest.approx(terms_by_hand(only(), saes, acts)["align"].item(), rel=1e-10)


def test_cross_is_the_mean_over_all_ordered_pairs(three_sources):
    """cross = mean over the 6 ordered pairs (a, b) of FVU(x_b, Dec_b(Enc_a(x_a)))."""
    saes, acts = three_sources
    parts = loss_terms(only(cross=1.0), saes, acts)
    assert parts["cross"].item() == pytest.approx(terms_by_hand(only(), saes, acts)["cross"].item(), rel=1e-10)


def test_total_is_the_weighted_sum(three_sources):
    """total = recon + sparsity + align * weight + cross * weight."""
    saes, acts = three_sources
    latent = only(l1=0.01, l2=0.02, align=0.3, cross=2.5)
    parts = loss_terms(latent, saes, acts)
    e = terms_by_hand(latent, saes, acts)
    for key in e:
        assert parts[key].item() == pytest.approx(e[key].item(), rel=1e-10), key
    expected = e["recon"] + e["sparsity"] + 0.3 * e["align"] + 2.5 * e["cross"]
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-10)


def test_fired_is_or_ed_with_the_latents_active_in_any_source(three_sources):
    """`fired` gains the latents active on some token in some source and keeps what it held."""
    saes, acts = three_sources
    with torch.no_grad():
        for sae in saes.values():
            sae.b_enc[[4, 5]] = -1e3  # 4 and 5 fire nowhere
        saes["c"].b_enc[3] = -1e3  # 3 fires in a and b only
    fired = torch.zeros(6, dtype=torch.bool)
    fired[5] = True
    loss_terms(only(), saes, acts, fired)
    assert fired.tolist() == [True, True, True, True, False, True]


def test_unweighted_and_lone_terms_are_zero(three_sources):
    """Terms of weight 0 are not computed (0 in the training log), and one source alone has nothing to align or
    cross-reconstruct."""
    saes, acts = three_sources
    parts = loss_terms(only(), saes, acts)
    assert parts["align"].item() == 0 and parts["cross"].item() == 0
    alone = loss_terms(only(align=1.0, cross=1.0), {"a": saes["a"]}, {"a": acts["a"]})
    assert alone["align"].item() == 0 and alone["cross"].item() == 0
    assert alone["total"].item() == pytest.approx(alone["recon"].item())


def test_mark_fired_by_hand():
    """A latent fired if its code is above zero on some token, dense or (values, indices); a TopK latent chosen
    at zero (fewer than k positive) did not fire."""
    from saemerge.losses import mark_fired

    fired = torch.tensor([True, False, False, False])
    mark_fired(fired, torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.25, 0.0]]))
    assert fired.tolist() == [True, True, True, False]
    fired = torch.zeros(4, dtype=torch.bool)
    mark_fired(fired, (torch.tensor([[0.5, 0.0], [0.0, 0.25]]), torch.tensor([[1, 2], [0, 3]])))
    assert fired.tolist() == [False, True, False, True]


def test_topk_sparse_codes_give_the_loss_of_dense_codes():
    """The (values, indices) TopK path gives every term of the dense hand computation, `cosine` included."""
    names, widths = ["a", "b", "c"], [3, 4, 5]
    saes = {n: random_sae(d, 8, seed=40 + i, offset=1.0, act_scale=1.3, activation="topk", k=3)
            for i, (n, d) in enumerate(zip(names, widths))}
    acts = {n: data(d, 16, seed=50 + i, offset=1.0) for i, (n, d) in enumerate(zip(names, widths))}
    latent = LatentSpec(size=8, activation="topk", k=3, l1=0.05, l2=0.1, align=0.7, cross=1.5)
    fired = torch.zeros(8, dtype=torch.bool)
    parts = loss_terms(latent, saes, acts, fired)
    e = terms_by_hand(latent, saes, acts)
    for key in e:
        assert parts[key].item() == pytest.approx(e[key].item(), rel=1e-9), key
    assert fired.tolist() == (sum((codes_by_hand(saes[n], acts[n]) > 0).sum(0) for n in names) > 0).tolist()

    sparse = {n: saes[n].encode_topk(acts[n]) for n in names}
    dense = {n: codes_by_hand(saes[n], acts[n]) for n in names}
    for a, b in itertools.combinations(names, 2):
        by_hand = torch.stack([cos_by_hand(dense[a][t], dense[b][t]) for t in range(16)])
        torch.testing.assert_close(cosine(sparse[a], sparse[b]), by_hand, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cosine(dense[a], dense[b]), by_hand, rtol=1e-10, atol=1e-12)


# --- the merged model before calibration ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts(zoo):
    """Two zoo sources (gpt2 -> llama) at block 1 and random SAEs for them."""
    sources = {"a": AutoModelForCausalLM.from_pretrained(zoo["gpt2"]).eval(),
               "b": AutoModelForCausalLM.from_pretrained(zoo["llama"]).eval()}
    layers = {n: [resolve_layer(m, 1)] for n, m in sources.items()}
    latent = LatentSpec(size=32, activation="relu")
    saes = [{}]
    for i, (n, m) in enumerate(sources.items()):
        saes[0][n] = new_sae(latent, m.config.hidden_size)
        saes[0][n].init_random(torch.Generator().manual_seed(i))
    return sources, saes, layers


def merged_logits(parts, **merge):
    """The merged model of `parts` wired by `merge` (target b), and its logits on IDS."""
    sources, saes, layers = parts
    model = merged_model(sources, saes, layers, MergeSpec(target="b", **merge))
    with torch.no_grad():
        return model, model(IDS).logits


def test_gates_start_as_the_identity(parts):
    """Uncalibrated latent gates are 1 (2 sigmoid of the parameter), token gates give 1, and the logits are those
    of the model without gates (which do differ from the target alone)."""
    gated, with_gates = merged_logits(parts, gates=["latent", "token"])
    for parameter in gated.latent_gates[0].values():
        torch.testing.assert_close(2 * torch.sigmoid(parameter), torch.ones(32))
    gate = gated.token_gates[0]["b"]
    torch.testing.assert_close(2 * torch.sigmoid(gate(torch.randn(5, gate.in_features))), torch.ones(5, 1))
    _, without = merged_logits(parts)
    _, target_alone = merged_logits(parts, scale=0.0)
    torch.testing.assert_close(with_gates, without, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(without, target_alone, atol=1e-3)


def test_router_starts_uniform(parts):
    """Before calibration `heads: router` gives the logits of `heads: mean` (equal weights on every head)."""
    routed, by_router = merged_logits(parts, heads="router")
    _, by_mean = merged_logits(parts, heads="mean")
    features = torch.randn(4, routed.router.in_features)
    torch.testing.assert_close(routed.router(features).softmax(-1), torch.full((4, 2), 0.5))
    torch.testing.assert_close(by_router, by_mean, rtol=1e-5, atol=1e-5)


# --- the SAE itself ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_init_from_data_by_hand(activation):
    """Input scale = mean norm / sqrt(d); b_dec = the mean of the scaled data; latent j = the scaled, centred token
    rows[j], normalised; W_enc = c * W_dec^T with c the least-squares factor that sizes the first reconstruction."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * 3 + 2
    rows = torch.tensor([3, 17, 0, 29, 8, 11, 35, 21])
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=8, activation=activation, k=3)).double()
    sae.init_from_data(x, rows)

    scale = x.norm(dim=-1).mean() / 6 ** 0.5
    xs = x / scale
    mean = xs.mean(0)
    w = torch.stack([(xs[r] - mean) / (xs[r] - mean).norm() for r in rows.tolist()])
    z = ((xs - mean) @ w.T).clamp_min(0)  # b_enc = 0, encoder = decoder transpose
    if activation == "topk":
        z = torch.where(z >= z.sort(dim=-1, descending=True).values[:, 2:3], z, 0.0)
    recon = z @ w
    c = ((xs - mean) * recon).sum() / (recon ** 2).sum()
    torch.testing.assert_close(sae.act_scale, scale)
    torch.testing.assert_close(sae.b_dec, mean)
    torch.testing.assert_close(sae.W_dec, w)
    torch.testing.assert_close(sae.W_enc, c * w.T)
    assert c < 1  # the reconstruction before the factor is too large


def test_init_from_data_without_bias_keeps_b_dec_zero():
    sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=5, bias=False)).double()
    sae.init_from_data(torch.randn(20, 4, dtype=torch.float64) + 3, torch.arange(5))
    assert torch.equal(sae.b_dec, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_a_batch_of_sequences_is_coded_token_by_token(activation):
    """[batch, seq, d] inputs (what the merged model passes) give each token's own code and reconstruction."""
    sae = random_sae(5, 12, seed=7, offset=1.0, act_scale=2.0, activation=activation, k=3)
    x = data(5, 24, seed=8, offset=1.0)
    flat, batched = sae.encode(x), sae.encode(x.reshape(4, 6, 5))
    torch.testing.assert_close(batched.reshape(24, 12), flat)
    torch.testing.assert_close(flat, codes_by_hand(sae, x))
    torch.testing.assert_close(sae.decode(batched).reshape(24, 5), decode_by_hand(sae, flat))
    if activation == "topk":
        values, indices = sae.encode_topk(x.reshape(4, 6, 5))
        dense = torch.zeros(4, 6, 12, dtype=torch.float64).scatter_(-1, indices, values)
        torch.testing.assert_close(dense.reshape(24, 12), flat)
        torch.testing.assert_close(sae.decode_topk(values, indices), sae.decode(batched))


def test_topk_backward_passes_no_gradient_through_chosen_latents_that_relu_zeroed():
    """When fewer than k pre-activations are positive, the chosen ones at zero get no gradient, as in dense
    autograd of relu(topk(.))."""
    from saemerge.sae import TopKEncode

    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    W = torch.randn(5, 10, generator=g, dtype=torch.float64)
    b_enc = torch.randn(10, generator=g, dtype=torch.float64) - 2.0  # most pre-activations negative
    b_dec = torch.randn(5, generator=g, dtype=torch.float64)
    weights = torch.randn(6, 10, generator=g, dtype=torch.float64)  # a loss on the dense code
    ours = [t.clone().requires_grad_() for t in (x, b_dec, W, b_enc)]
    values, indices = TopKEncode.apply(*ours, 4)
    assert (values == 0).any()  # the case under test
    (torch.zeros(6, 10, dtype=torch.float64).scatter(-1, indices, values) * weights).sum().backward()
    dense = [t.clone().requires_grad_() for t in (x, b_dec, W, b_enc)]
    top = ((dense[0] - dense[1]) @ dense[2] + dense[3]).topk(4, dim=-1)
    (torch.zeros(6, 10, dtype=torch.float64).scatter(-1, top.indices, top.values.relu()) * weights).sum().backward()
    for name, a, b in zip(("x", "b_dec", "W", "b_enc"), ours, dense):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_restarted_encoder_columns_take_the_norm_of_the_live_ones_only():
    sae = SparseAutoencoder(SAEConfig(d_in=3, d_sae=4)).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3, 4, dtype=torch.float64) * torch.tensor([2.0, 2.0, 50.0, 0.0]))
    sae.resample(torch.tensor([2, 3]), torch.randn(2, 3, dtype=torch.float64))
    torch.testing.assert_close(sae.W_enc[:, 2:].norm(dim=0), torch.full((2,), 0.2 * 2.0, dtype=torch.float64))


@pytest.mark.parametrize("activation,factor", [("relu", 0.2), ("topk", 1.0)])
def test_resampling_every_latent_gives_encoder_columns_of_the_fallback_norm(activation, factor):
    """With no live latent to take a norm from, restarted encoder columns have norm 1 (x 0.2 for relu)."""
    sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=3, activation=activation, k=1)).double()
    directions = torch.randn(3, 4, dtype=torch.float64) * 5
    sae.resample(torch.arange(3), directions)
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((3,), factor, dtype=torch.float64))
    torch.testing.assert_close(sae.W_dec, directions / directions.norm(dim=-1, keepdim=True))


# --- the bridge and the heads --------------------------------------------------------------------------------------
@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_sae_bridge_sends_codes_and_adds_their_decoding_by_hand(parts, combine):
    """sum: Dec_b(z_a) without bias; mean: Dec_b((z_a - z_b) / 2) without bias; gates multiply per latent by
    2 sigmoid(g) and per token by 2 sigmoid(w . [h_a / s_a, h_b / s_b] + c)."""
    sources, saes, layers = parts
    g = torch.Generator().manual_seed(11)
    saved = {n: (sae.act_scale.clone(), sae.b_dec.clone()) for n, sae in saes[0].items()}
    with torch.no_grad():  # scales and decoder biases that are not the identity, so that each is seen
        for n, sae in saes[0].items():
            sae.act_scale.fill_(2.0 if n == "a" else 0.5)
            sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g))
    h = {"a": torch.randn(2, 5, 32, generator=g), "b": torch.randn(2, 5, 48, generator=g)}
    model = merged_model(sources, saes, layers, MergeSpec(target="b", combine=combine, gates=["latent", "token"]))
    latent_gate, token_gate = model.latent_gates[0]["b"], model.token_gates[0]["b"]
    with torch.no_grad():
        latent_gate.copy_(torch.randn(32, generator=g))
        token_gate.weight.copy_(torch.randn(1, 80, generator=g) * 0.1)
        token_gate.bias.fill_(0.3)
        sent = model.bridge.send(0, {"a": h["a"]})
        delta = model.bridge.receive("b", 0, h["b"], sent, {"a": h["a"]})
    a, b = saes[0]["a"], saes[0]["b"]
    with torch.no_grad():
        z = {"a": codes_by_hand(a, h["a"].reshape(10, 32)), "b": codes_by_hand(b, h["b"].reshape(10, 48))}
        torch.testing.assert_close(sent["a"].reshape(10, 32), z["a"])
        code = z["a"] if combine == "sum" else (z["a"] - z["b"]) / 2
        code = code * 2 * torch.sigmoid(latent_gate)
        inputs = torch.cat([h["a"].reshape(10, 32) / a.act_scale, h["b"].reshape(10, 48) / b.act_scale], -1)
        expected = (code @ b.W_dec) * b.act_scale * 2 * torch.sigmoid(inputs @ token_gate.weight.T + 0.3)
        for n, (scale, bias) in saved.items():
            saes[0][n].act_scale.copy_(scale)
            saes[0][n].b_dec.copy_(bias)
    torch.testing.assert_close(delta.reshape(10, 48), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("spread", [1.0, 300.0])
def test_heads_mix_as_a_weighted_sum_of_probabilities(grad, spread):
    """log sum_s w_s softmax(logits_s), in place without autograd and differentiable with it; with logits spread
    so wide that some probabilities underflow float32 (spread 300), still finite and exact in log space."""
    g = torch.Generator().manual_seed(12)
    logits = [(spread * torch.randn(2, 3, 7, generator=g)).requires_grad_(grad) for _ in range(3)]
    log_w = torch.randn(2, 3, 3, generator=g).log_softmax(-1)
    expected = torch.stack([log_w[..., s, None] + logits[s].detach().double().log_softmax(-1)
                            for s in range(3)]).logsumexp(0).float()
    from saemerge.heads import mix_heads

    with torch.set_grad_enabled(grad):
        mixed = mix_heads(log_w, list(logits))
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.detach(), expected)
    if grad:
        mixed.sum().backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in logits)
