"""The merged model's config: its sources (their own configs, layers and where they come from), how they are
wired (target, inject, heads), the bridge between them and the latent space."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


class SAEMergedConfig(PretrainedConfig):
    model_type = "saemerge"

    def __init__(self, sources: list[dict] | None = None, target: str | None = None, inject: list[str] | None = None,
                 combine: str = "mean", scale: float = 1.0, heads: str = "target", gates: list[str] | None = None,
                 latent: dict | None = None, storage: str = "self-contained", bridge: str = "sae", **kwargs):
        # sources: [{"name", "config": the source's config dict, "layers": module paths, "d_model",
        #            "reference": load_pretrained_source's arguments (model id or path, revision, ...),
        #            "own_tokenizer": true if it reads with another tokenizer than the target's (retokenize.py)}]
        self.sources = sources or []
        self.target = target
        self.inject = inject if inject is not None else [s["name"] for s in self.sources if s["name"] != target]
        self.combine = combine
        self.scale = scale
        self.heads = heads
        self.gates = list(gates or [])
        self.latent = latent or {}  # d_sae, activation, k, bias
        # self-contained: the sources' weights are in the folder; reference: only their ids (like a PEFT adapter)
        self.storage = storage
        self.bridge = bridge  # what carries features between the sources: a name in modeling.BRIDGES
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
    def own_tokenizers(self) -> list[str]:
        """The sources that read the text with a tokenizer other than the target's."""
        return [s["name"] for s in self.sources if s.get("own_tokenizer")]

    @property
    def n_sites(self) -> int:
        return len(self.sources[0]["layers"]) if self.sources else 0
