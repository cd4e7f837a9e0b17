"""The merged model: sources side by side, features carried into the target's residual stream by the SAEs.

forward(ids): each injecting source A runs up to its layer, z_A = Enc_A(h_A); at the target's layer
  sum:  h_T += scale * sum_A Dec_T(z_A)                        (decoder bias left out: h_T already has the mean)
  mean: h_T += scale * (mean over {T} + A of Dec_T(z) - Dec_T(z_T))
        i.e. the target's own reconstruction is averaged with those decoded from the other codes, and the
        target's reconstruction error h_T - Dec_T(z_T) is kept.
The target then runs to the end and its head gives the logits. scale = 0 gives the target alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .hooks import ResidualHook, run_to_layer
from .sae import SAEConfig, SparseAutoencoder


class SAEMergedConfig(PretrainedConfig):
    model_type = "saemerge"

    def __init__(self, sources: list[dict] | None = None, target: str | None = None, inject: list[str] | None = None,
                 combine: str = "mean", scale: float = 1.0, latent: dict | None = None, **kwargs):
        # sources: [{"name", "config": the source's config dict, "layer": module path, "d_model"}]
        self.sources = sources or []
        self.target = target
        self.inject = inject if inject is not None else [s["name"] for s in self.sources if s["name"] != target]
        self.combine = combine
        self.scale = scale
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


class SAEMergedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SAEMergedConfig
    base_model_prefix = "saemerge"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: SAEMergedConfig, sources: dict[str, PreTrainedModel] | None = None,
                 saes: dict[str, SparseAutoencoder] | None = None):
        super().__init__(config)
        if sources is None:
            sources = {s["name"]: AutoModelForCausalLM.from_config(config.source_config(s["name"]))
                       for s in config.sources}
        if saes is None:
            saes = {s["name"]: SparseAutoencoder(SAEConfig(d_in=s["d_model"], **config.latent)) for s in config.sources}
        self.sources = nn.ModuleDict(sources)
        self.saes = nn.ModuleDict(saes)
        self.layers = {s["name"]: s["layer"] for s in config.sources}
        self.post_init()
        self.generation_config.use_cache = False  # each source's KV cache is not wired yet: recompute

    def post_init(self):
        super().post_init()
        # The sources sit inside a ModuleDict, which hides their tied embeddings from the base class.
        self.all_tied_weights_keys.update(self.get_expanded_tied_weights_keys(all_submodels=True))

    def _init_weights(self, module):
        pass  # sources and SAEs arrive trained, or are loaded from the checkpoint

    @property
    def target(self) -> PreTrainedModel:
        return self.sources[self.config.target]

    def get_input_embeddings(self):
        return self.target.get_input_embeddings()

    def get_output_embeddings(self):
        return self.target.get_output_embeddings()

    def injected(self, h_target: torch.Tensor, codes: list[torch.Tensor]) -> torch.Tensor:
        """What is added to the target's residual stream, given the other sources' codes."""
        sae = self.saes[self.config.target]
        if self.config.combine == "sum":
            delta = sum(sae.decode(z, bias=False) for z in codes)
        else:
            z_t = sae.encode(h_target)
            # Biases cancel in the difference of two reconstructions, so decode the code difference alone.
            delta = sae.decode(sum(z - z_t for z in codes) / (len(codes) + 1), bias=False)
        return self.config.scale * delta

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        codes = []
        for name in self.config.inject:
            h = run_to_layer(self.sources[name], self.layers[name], input_ids, attention_mask)
            codes.append(self.saes[name].encode(h))
        with ResidualHook(self.target, self.layers[self.config.target], "inject",
                          vector=lambda h: self.injected(h, codes)):
            out = self.target(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)


def register_auto_classes() -> None:
    AutoConfig.register(SAEMergedConfig.model_type, SAEMergedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SAEMergedConfig, SAEMergedForCausalLM, exist_ok=True)
