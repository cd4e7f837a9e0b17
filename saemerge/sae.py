"""A sparse autoencoder over one model's residual stream.

Weights follow SAELens naming and shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
Inputs are divided by `act_scale` (mean activation norm / sqrt(d_in), set from data) so that penalties mean the
same thing for models whose residual streams differ in scale; outputs are scaled back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


class TopKEncode(torch.autograd.Function):
    """values, indices = topk((x - b_dec) @ W + b_enc, k), values relu'd; the backward touches only the k chosen
    latents of each token.

    Autograd through a dense topk would backpropagate an [N, d_sae] gradient through the encoder matmul; this
    scatters the [N, k] gradient instead (a sparse matrix product), which makes a TopK step several times faster.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W, b_enc, k: int):
        centred = x - b_dec
        values, indices = torch.addmm(b_enc, centred, W).topk(k, dim=-1, sorted=False)
        values = values.relu()
        ctx.save_for_backward(centred, W, indices, values)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        centred, W, indices, values = ctx.saved_tensors
        grad = (grad_values * (values > 0)).to(W.dtype)
        n, k = indices.shape
        per_latent = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device).index_add_(0, indices.flatten(),
                                                                                         grad.flatten())
        grad_x = grad_b_dec = grad_W = None
        if ctx.needs_input_grad[0]:  # sum over the k latents of grad * W[:, latent]
            grad_x = F.embedding_bag(indices, W.T.contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:  # the sum of grad_x over tokens, without forming grad_x
            grad_b_dec = -(W @ per_latent)
        if ctx.needs_input_grad[2]:  # W.grad[:, j] = sum over the tokens that chose j of grad * centred
            rows = torch.arange(n, device=W.device).repeat_interleave(k)
            chosen = torch.sparse_coo_tensor(torch.stack([indices.flatten(), rows]), grad.flatten(),
                                             (W.shape[1], n), check_invariants=False)
            grad_W = torch.sparse.mm(chosen, centred.to(W.dtype)).T
        return grad_x, grad_b_dec, grad_W, per_latent, None


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    activation: str = "relu"  # relu | topk
    k: int = 32
    bias: bool = True


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in))
        if cfg.bias:
            self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
            self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        else:  # kept as zero buffers so the file format does not change
            self.register_buffer("b_enc", torch.zeros(cfg.d_sae))
            self.register_buffer("b_dec", torch.zeros(cfg.d_in))
        self.register_buffer("act_scale", torch.ones(()))
        self.init_random()

    # --- initialisation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_random(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder tied to the decoder's transpose."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Set the input scale and decoder bias from `x` [tokens, d_in], and make latent j the
        normalised centred activation of token `rows[j]` (encoder = decoder transpose).

        Aligned SAEs pass the same `rows` for every source, so latent j starts as the same token
        in every model: the shared latent space starts aligned.
        """
        x = x.float()
        self.act_scale.fill_(x.norm(dim=-1).mean().item() / self.cfg.d_in ** 0.5)
        x = x / self.act_scale
        if self.cfg.bias:
            self.b_dec.copy_(x.mean(0))
        if rows is not None:
            w = x[rows] - self.b_dec
            w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
        # With encoder = decoder transpose, every active latent copies the input once: the reconstruction is
        # far too large. Codes scale linearly with the encoder (ReLU and TopK alike, b_enc = 0), so one
        # least-squares factor makes the first reconstruction the right size.
        centred = x - self.b_dec
        recon = self.encode(x * self.act_scale) @ self.W_dec
        self.W_enc.mul_((centred * recon).sum() / recon.pow(2).sum().clamp_min(1e-12))

    @torch.no_grad()
    def resample(self, latents: torch.Tensor, directions: torch.Tensor) -> None:
        """Restart `latents` as the given input-space `directions` [len(latents), d_in] (normalised here), with
        no encoder bias and encoder columns at the mean norm of the live ones (ReLU: a fifth of it, so a restart
        does not flood the codes; TopK needs the full norm or a restarted latent never enters the top k)."""
        live = torch.ones(self.cfg.d_sae, dtype=torch.bool, device=latents.device)
        live[latents] = False
        norm = self.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec[latents] = directions
        self.W_enc[:, latents] = directions.T * norm * (1.0 if self.cfg.activation == "topk" else 0.2)
        if self.cfg.bias:
            self.b_enc[latents] = 0.0

    # --- forward --------------------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc) / self.act_scale  # the SAE's dtype and device
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [..., d_sae]."""
        if self.cfg.activation == "topk":
            values, indices = self.encode_topk(x)
            return values.new_zeros(*values.shape[:-1], self.cfg.d_sae).scatter_(-1, indices, values)
        return self.pre_acts(x).relu()

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK codes as (values, indices), each [..., k]; what training uses (see TopKEncode)."""
        x = x.to(self.W_enc) / self.act_scale
        values, indices = TopKEncode.apply(x.reshape(-1, x.shape[-1]), self.b_dec, self.W_enc, self.b_enc, self.cfg.k)
        return values.reshape(*x.shape[:-1], -1), indices.reshape(*x.shape[:-1], -1)

    def decode(self, z: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Back to the residual stream; `bias=False` leaves out the decoder bias (the data mean)."""
        out = z @ self.W_dec
        if bias:
            out = out + self.b_dec
        return out * self.act_scale

    def decode_topk(self, values: torch.Tensor, indices: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """`decode` of sparse codes: a weighted sum of k decoder rows per token, never an [N, d_sae] product."""
        out = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), self.W_dec, mode="sum",
                              per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype))
        out = out.reshape(*values.shape[:-1], -1)
        if bias:
            out = out + self.b_dec
        return out * self.act_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)).to(x.dtype)

    # --- decoder norm ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows, so an L1 penalty cannot be dodged by shrinking codes and growing rows."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each decoder row (it would only change the row's norm)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    # --- files ----------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """`cfg.json` + `sae.safetensors`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cfg.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, folder / "sae.safetensors")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        folder = Path(folder)
        sae = cls(SAEConfig(**json.loads((folder / "cfg.json").read_text())))
        sae.load_state_dict(load_file(folder / "sae.safetensors", device=str(device)))
        return sae.to(device)
