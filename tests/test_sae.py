import torch

from saemerge import SAEConfig, SparseAutoencoder
from saemerge.losses import fvu


def test_topk_keeps_k_and_relu_is_nonnegative():
    x = torch.randn(50, 16)
    topk = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, activation="topk", k=5))
    z = topk.encode(x)
    assert ((z != 0).sum(-1) <= 5).all() and ((z != 0).sum(-1) >= 1).any()
    relu = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64))
    assert (relu.encode(x) >= 0).all() and (relu.encode(x) > 0).any()


def test_data_init_aligns_latents_across_sources_and_sets_scale():
    x_a, x_b = torch.randn(100, 8) * 50 + 3, torch.randn(100, 12)
    rows = torch.arange(10, 42)
    a = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32))
    b = SparseAutoencoder(SAEConfig(d_in=12, d_sae=32))
    a.init_from_data(x_a, rows)
    b.init_from_data(x_b, rows)
    assert abs(a.act_scale.item() - x_a.norm(dim=-1).mean().item() / 8 ** 0.5) < 1e-3
    # Latent j fires most on token rows[j] in both models: the same slot starts as the same token.
    assert (a.encode(x_a[rows]).argmax(-1) == torch.arange(32)).float().mean() > 0.9
    assert (b.encode(x_b[rows]).argmax(-1) == torch.arange(32)).float().mean() > 0.9


def test_decoder_norm_and_parallel_grads():
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16))
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(16))
    sae.W_dec.grad = sae.W_dec.detach() * 2 + torch.randn(16, 8)
    sae.remove_parallel_grads()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5


def test_no_bias_means_zero_untrained_biases():
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, bias=False))
    sae.init_from_data(torch.randn(40, 8) + 5, None)
    assert sae.b_dec.abs().sum() == 0 and "b_dec" not in dict(sae.named_parameters())


def test_save_load_round_trip(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, activation="topk", k=4))
    sae.init_from_data(torch.randn(40, 8) * 7, torch.arange(16))
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    x = torch.randn(5, 8)
    assert loaded.cfg == sae.cfg and torch.equal(loaded(x), sae(x))


def test_fvu_is_one_minus_explained_variance():
    x = torch.randn(100, 4)
    assert abs(fvu(x, x.mean(0).expand_as(x)).item() - 1) < 1e-6
    assert fvu(x, x).item() == 0


def test_sparse_topk_training_path_matches_dense_autograd():
    """encode_topk/decode_topk (TopKEncode's hand-written backward, embedding_bag) give the outputs and the
    gradients of plain autograd through a dense top-k; gradcheck in float64 checks the backward itself."""
    from saemerge.sae import TopKEncode

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, activation="topk", k=4))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.act_scale.fill_(1.7)
    x = torch.randn(2, 5, 16)

    pre = sae.pre_acts(x)
    values, indices = pre.topk(4, dim=-1)
    dense = sae.decode(torch.zeros_like(pre).scatter_(-1, indices, values.relu()))
    dense.pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    sparse = sae.decode_topk(*sae.encode_topk(x))
    sparse.pow(2).sum().backward()
    assert torch.allclose(sparse, dense, atol=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-4), name

    inputs = [torch.randn(7, 16, dtype=torch.float64, requires_grad=True),  # x, b_dec, W, b_enc
              torch.randn(16, dtype=torch.float64, requires_grad=True),
              torch.randn(16, 64, dtype=torch.float64, requires_grad=True),
              torch.randn(64, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *a: TopKEncode.apply(*a, 4)[0], inputs)
