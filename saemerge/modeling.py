"""The merged model: sources side by side, features carried between residual streams by the SAEs.

A receiver R gets, at each of its layers (a "site": the i-th layers of all sources share one latent space),
the features of the other sources A at that site (codes z_A = Enc_A(h_A)):
  sum:  h_R += scale * t * Dec_R(g * sum_A z_A)                     (no decoder bias: h_R already has the mean)
  mean: h_R += scale * t * Dec_R(g * sum_A (z_A - z_R) / (n + 1))
        = the mean of R's own reconstruction and those decoded from the other codes, keeping R's
          reconstruction error h_R - Dec_R(z_R).
g is a per-latent gate and t a per-token gate (both 1 unless calibrated; see calibrate.py).

heads decides who receives and which head speaks:
  target: only `target` receives (from `inject`), and its head gives the logits;
  mean:   every source receives from all the others; the heads' next-token distributions are averaged;
  router: the same, mixed per token by a learned router over the sources' residuals.
scale = 0 gives the target alone (target), the logit ensemble (mean) or a routed ensemble (router).
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .hooks import ResidualHook, run_to_layers
from .sae import SAEConfig, SparseAutoencoder


class SAEMergedConfig(PretrainedConfig):
    model_type = "saemerge"

    def __init__(self, sources: list[dict] | None = None, target: str | None = None, inject: list[str] | None = None,
                 combine: str = "mean", scale: float = 1.0, heads: str = "target", gates: list[str] | None = None,
                 latent: dict | None = None, **kwargs):
        # sources: [{"name", "config": the source's config dict, "layers": module paths, "d_model"}]
        self.sources = sources or []
        self.target = target
        self.inject = inject if inject is not None else [s["name"] for s in self.sources if s["name"] != target]
        self.combine = combine
        self.scale = scale
        self.heads = heads
        self.gates = list(gates or [])
        self.latent = latent or {}  # d_sae, activation, k, bias
        target_config = self.source_config(target) if target else None
        if target_config is not None:
            # What generic tools (lm-eval, generate) read off a causal LM's config.
            text = target_config.get_text_config()
            for key in ("vocab_size", "max_position_embeddings", "n_positions", "bos_token_id", "eos_token_id",
                        "pad_token_id"):
                if getattr(text, key, None) is not None:
                    kwargs.setdefault(key, getattr(text, key))
        kwargs.setdefault("tie_word_embeddings", False)  # the sources tie their own weights
        super().__init__(**kwargs)

    def source_config(self, name: str) -> PretrainedConfig | None:
        for s in self.sources:
            if s["name"] == name:
                return AutoConfig.for_model(**s["config"])
        return None

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.sources]

    @property
    def n_sites(self) -> int:
        return len(self.sources[0]["layers"]) if self.sources else 0

    def senders_to(self, receiver: str) -> list[str]:
        if self.heads == "target":
            return list(self.inject) if receiver == self.target else []
        return [n for n in self.names if n != receiver]

    @property
    def receivers(self) -> list[str]:
        return [self.target] if self.heads == "target" else self.names


class SAEMergedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SAEMergedConfig
    base_model_prefix = "saemerge"
    main_input_name = "input_ids"

    def __init__(self, config: SAEMergedConfig, sources: dict[str, PreTrainedModel] | None = None,
                 saes: dict[str, SparseAutoencoder] | None = None):
        super().__init__(config)
        if sources is None:
            sources = {s["name"]: AutoModelForCausalLM.from_config(config.source_config(s["name"]))
                       for s in config.sources}
        if saes is None:
            saes = [{s["name"]: SparseAutoencoder(SAEConfig(d_in=s["d_model"], **config.latent)) for s in config.sources}
                    for _ in range(config.n_sites)]
        sites = range(config.n_sites)
        self.sources = nn.ModuleDict(sources)
        self.saes = nn.ModuleList([nn.ModuleDict(site) for site in saes])  # saes[site][source]
        self.layers = {s["name"]: s["layers"] for s in config.sources}
        d_all = sum(s["d_model"] for s in config.sources)
        # Calibration parameters start as the identity: gates of 1 (2 * sigmoid(0)) and a uniform router.
        self.latent_gates = nn.ModuleList([nn.ParameterDict(
            {r: nn.Parameter(torch.zeros(config.latent["d_sae"])) for r in config.receivers if "latent" in config.gates})
            for _ in sites])
        self.token_gates = nn.ModuleList([nn.ModuleDict(
            {r: nn.Linear(d_all, 1) for r in config.receivers if "token" in config.gates}) for _ in sites])
        self.router = nn.Linear(d_all, len(config.sources)) if config.heads == "router" else None
        for module in [*(g for site in self.token_gates for g in site.values()), self.router]:
            if module is not None:
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
        self.post_init()
        self.generation_config.use_cache = False  # each source's KV cache is not wired yet: recompute

    def post_init(self):
        super().post_init()
        # The sources sit inside a ModuleDict, which hides their tied embeddings from the base class.
        self.all_tied_weights_keys.update(self.get_expanded_tied_weights_keys(all_submodels=True))

    def _init_weights(self, module):
        pass  # sources and SAEs arrive trained, calibration parameters are set in __init__, or all are loaded

    @property
    def target(self) -> PreTrainedModel:
        return self.sources[self.config.target]

    def get_input_embeddings(self):
        return self.target.get_input_embeddings()

    def get_output_embeddings(self):
        return self.target.get_output_embeddings()

    def calibration_parameters(self) -> list[nn.Parameter]:
        """What calibration trains: gates and router (sources and SAEs stay frozen)."""
        modules = [self.latent_gates, self.token_gates] + ([self.router] if self.router is not None else [])
        return [p for m in modules for p in m.parameters()]

    # --- the merge ------------------------------------------------------------------------------------------
    def _features(self, site: int, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every source's residual at one site, each divided by its SAE's scale, side by side."""
        return torch.cat([residuals[n] / self.saes[site][n].act_scale for n in self.config.names], dim=-1)

    def injected(self, receiver: str, site: int, h: torch.Tensor, codes: dict[str, torch.Tensor],
                 residuals: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """What is added to `receiver`'s residual stream h at one site, given the other sources' codes there
        (codes and residuals: {source: tensor} at that site)."""
        sae = self.saes[site][receiver]
        senders = self.config.senders_to(receiver)
        if self.config.combine == "sum":
            code = sum(codes[a] for a in senders)
        else:
            # Biases cancel in the difference of two reconstructions, so decode the code difference alone.
            z_r = codes[receiver] if receiver in codes else sae.encode(h)
            code = sum(codes[a] - z_r for a in senders) / (len(senders) + 1)
        if receiver in self.latent_gates[site]:
            code = code * 2 * torch.sigmoid(self.latent_gates[site][receiver])
        delta = sae.decode(code, bias=False)
        if receiver in self.token_gates[site]:
            features = self._features(site, {**residuals, receiver: h})
            delta = delta * 2 * torch.sigmoid(self.token_gates[site][receiver](features))
        return self.config.scale * delta.to(h.dtype)

    def _residuals(self, names, input_ids, attention_mask) -> list[dict[str, torch.Tensor]]:
        """Run each named source up to its last layer only; residuals per site."""
        runs = {n: run_to_layers(self.sources[n], self.layers[n], input_ids, attention_mask) for n in names}
        return [{n: runs[n][site] for n in names} for site in range(self.config.n_sites)]

    def _run_receiver(self, name, input_ids, attention_mask, codes, residuals):
        """A full forward of source `name`, receiving the others' features at its layers (if any).
        Returns its logits and its residual at the last site (the router's input)."""
        model = self.sources[name]
        if self.config.scale == 0 or not self.config.senders_to(name):
            with ResidualHook(model, self.layers[name][-1], "capture") as hook:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return logits, hook.captured
        with ExitStack() as hooks:
            for site, layer in enumerate(self.layers[name]):
                hooks.enter_context(ResidualHook(model, layer, "inject", vector=lambda h, site=site: self.injected(
                    name, site, h, codes[site], residuals[site])))
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, residuals[-1].get(name)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        cfg = self.config
        exchange = cfg.scale != 0
        # Senders run to their layer first; receivers that are also senders run twice up to it (simple, not free).
        senders = sorted({a for r in cfg.receivers for a in cfg.senders_to(r)}, key=cfg.names.index) if exchange else []
        needs_all = exchange and ("token" in cfg.gates or cfg.heads != "target")
        residuals = self._residuals(cfg.names if needs_all else senders, input_ids, attention_mask)
        codes = [{n: self.saes[site][n].encode(h) for n, h in at_site.items()} for site, at_site in enumerate(residuals)]

        if cfg.heads == "target":
            logits, _ = self._run_receiver(cfg.target, input_ids, attention_mask, codes, residuals)
        else:
            outputs = {n: self._run_receiver(n, input_ids, attention_mask, codes, residuals) for n in cfg.names}
            log_probs = torch.stack([outputs[n][0].float().log_softmax(-1) for n in cfg.names])  # [S, B, T, V]
            if cfg.heads == "router":
                last = cfg.n_sites - 1
                weights = self.router(self._features(last, {n: outputs[n][1] for n in cfg.names})).log_softmax(-1)
                log_probs = log_probs + weights.permute(2, 0, 1).unsqueeze(-1)
            else:
                log_probs = log_probs - math.log(len(cfg.names))
            logits = log_probs.logsumexp(0)  # log of the mixed distribution: softmax(logits) is the mixture
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def register_auto_classes() -> None:
    AutoConfig.register(SAEMergedConfig.model_type, SAEMergedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SAEMergedConfig, SAEMergedForCausalLM, exist_ok=True)
