"""The merged model: sources side by side, features carried between their residual streams by a bridge.

A forward runs the sources side by side (lockstep.py), each once: all run up to a site, the bridge (sae_bridge.py)
turns the senders' residuals there into what each receiver gets (times `scale`), then each goes on to the next
site, and the receivers to their heads (wiring.py says who sends and who receives). heads:
  target: only `target` receives, and its head gives the logits;
  mean:   every source receives from all the others; the heads' next-token distributions are averaged;
  router: the same, mixed per token by a learned router over the sources' residuals.
scale = 0 gives the target alone (target), the logit ensemble (mean) or a routed ensemble (router). Mixed heads
are applied outside the sources' forwards, a chunk of positions at a time (heads.py), and only where
`logits_to_keep` asks. A sender may read with a tokenizer of its own (heads: target only): it reads the text of the target's tokens so
far, never more, in its own tokens (retokenize.py), and what it holds after reading up to token t reaches t.
Config: configuration.py; KV cache: cache.py; saving and loading: pretrained.py.
"""

from __future__ import annotations

import inspect
import math
from contextlib import ExitStack

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import OUTPUT_CACHE, MergedCache, cache_argument, given_cache
from .configuration import SAEMergedConfig
from .heads import OutputHead, mixed_log_probs, next_token_loss
from .hooks import resolve_layer, run_to_head
from .lockstep import Run, in_lockstep
from .pretrained import MergedModelFiles
from .retokenize import Retokenizer, read_prefixes
from .cross_attention_bridge import CrossAttentionBridge
from .linear_bridge import LinearBridge
from .sae import SparseAutoencoder
from .sae_bridge import SAEBridge, Step, scaled_residuals
from .wiring import receivers, runs, senders, senders_to

# config.bridge -> the class that carries features between the sources
BRIDGES = {"sae": SAEBridge, "linear": LinearBridge, "cross_attention": CrossAttentionBridge}


def onloaded(modules: list[nn.Module | None]) -> ExitStack:
    """Brings the parts of `modules` that a device map offloaded (to CPU or disk) onto their execution device for
    one forward: the merge calls the bridge's and the router's methods, and accelerate's offload hooks watch
    forward only."""
    stack = ExitStack()
    parts = [part for module in modules if module is not None for part in module.modules()]
    if any(p.device.type == "meta" for part in parts for p in part.parameters(recurse=False)):
        from accelerate.utils import align_module_device, has_offloaded_params

        for part in parts:
            if has_offloaded_params(part):
                stack.enter_context(align_module_device(part))
    return stack


def all_but_embeddings(model: PreTrainedModel) -> list[nn.Parameter]:
    """A model's parameters but its input and output embeddings (tied or not)."""
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in embeddings]


class SAEMergedForCausalLM(MergedModelFiles, PreTrainedModel, GenerationMixin):
    config_class = SAEMergedConfig
    base_model_prefix = "saemerge"
    main_input_name = "input_ids"

    def __init__(self, config: SAEMergedConfig, sources: dict[str, PreTrainedModel] | None = None,
                 saes: list[dict[str, SparseAutoencoder]] | None = None):
        super().__init__(config)
        if sources is None:
            # In the default dtype, which from_pretrained sets to its `dtype` (the sources' configs name their own).
            sources = {s["name"]: AutoModelForCausalLM.from_config(config.source_config(s["name"]),
                                                                   dtype=torch.get_default_dtype())
                       for s in config.sources}
        # Registered before the sources, under their own names (the keys of the saved weights): device_map="auto"
        # fills devices in this order, so these small modules land on the first device.
        self.bridge = BRIDGES[config.bridge](config, saes)
        for name, module in self.bridge.modules().items():
            self.add_module(name, module)
        d_all = sum(s["d_model"] for s in config.sources)
        self.router = nn.Linear(d_all, len(config.sources)) if config.heads == "router" else None
        if self.router is not None:  # uniform until calibrated
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)
        if config.own_tokenizers and config.heads != "target":
            raise ValueError(f"heads '{config.heads}' mixes next-token distributions, which needs one tokenizer, and "
                             f"{config.own_tokenizers} read with their own; expected heads 'target'")
        self.retokenizers: dict[str, Retokenizer] = {}  # set_tokenizers(); from_pretrained loads them
        self.sources = nn.ModuleDict(sources)
        self.layers = {s["name"]: s["layers"] for s in config.sources}
        # Found once: resolving a block index walks the model's modules, too slow to do at every generated token.
        self.sites = {name: [source.get_submodule(resolve_layer(source, layer)) for layer in self.layers[name]]
                      for name, source in sources.items()}
        self.heads = {name: OutputHead(source) for name, source in sources.items()}
        self.cache_arguments = {name: cache_argument(source) for name, source in sources.items()}
        self.keeps_logits = {name: "logits_to_keep" in inspect.signature(source.forward).parameters
                             for name, source in sources.items()}
        # What device_map must keep whole: post_init gathers it from child models only, and the sources are one
        # level down.
        self._no_split_modules = {m for source in sources.values() for m in source._no_split_modules or []}
        self.merge_files: dict[str, str] = {}  # MERGE_FILES of the merge that made this model, if known
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # transformers' own switch for models with a cache of their own (mamba, rwkv): generate then makes none and
        # takes the MergedCache that the first forward returns.
        return False

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

    def calibration_parameters(self, saes: bool = False, receiver: bool = False) -> list[nn.Parameter]:
        """What calibration trains: the bridge's own parameters (the SAE bridge's gates; its SAEs too with `saes`)
        and the router; with `receiver`, the target's weights too but not its embeddings (those would memorise the
        training tokens instead of learning to read the bridge); the other sources stay frozen."""
        own = all_but_embeddings(self.target) if receiver else []
        return self.bridge.calibration_parameters(saes) + (list(self.router.parameters()) if self.router else []) + own

    def set_tokenizers(self, tokenizers: dict) -> None:
        """Give the model the tokenizers it reads with ({source: tokenizer}, the target's among them), which it needs
        when a source reads with a tokenizer of its own."""
        target = tokenizers[self.config.target]
        self.retokenizers = {n: Retokenizer(target, tokenizers[n]) for n in self.config.own_tokenizers}

    def new_cache(self) -> MergedCache:
        """An empty KV cache: one DynamicCache for each source the forward runs, the bridge's own layers, and the
        target's tokens so far if a sender reads them with a tokenizer of its own."""
        caches = {f"source:{name}": DynamicCache(config=self.sources[name].config.get_text_config(decoder=True))
                  for name in runs(self.config)}
        if self._reads_text():
            caches["ids"] = Cache(layers=[DynamicLayer()])  # kept as a [batch, 1, tokens, 1] "key"
        if self.bridge.cache_layers():
            caches["bridge"] = Cache(layers=[DynamicLayer() for _ in range(self.bridge.cache_layers())])
        return MergedCache(caches)

    def _reads_text(self) -> bool:
        return any(n in self.config.own_tokenizers for n in senders(self.config))

    def _read(self, name: str, text: tuple, new: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sender `name`'s residuals at its layers for the last `new` of the target's tokens `text` = (ids so far,
        attention mask), read in its own tokenizer, and where it has read anything."""
        if name not in self.retokenizers:
            raise ValueError(f"source '{name}' reads with a tokenizer of its own: load the model with from_pretrained "
                             "(which loads its tokenizers) or call set_tokenizers() first")
        return read_prefixes(self.sources[name], self.layers[name], self.retokenizers[name], *text, new)

    def _exchange(self, site: int, at_site: dict[str, torch.Tensor], read: dict, keep: torch.Tensor | None,
                  step: Step) -> dict[str, torch.Tensor]:
        """What each receiver gets at `site` from the residuals there (`at_site`, with what the senders with a
        tokenizer of their own `read`), only where `keep` is 1 if given."""
        cfg = self.config
        at_site.update({n: residuals[site] for n, residuals in read.items()})
        if not (cross := senders(cfg)):
            return {}
        sent = self.bridge.send(site, {n: at_site[n] for n in cross}, step)
        added = {}
        for name in receivers(cfg):
            if senders_to(cfg, name):
                delta = cfg.scale * self.bridge.receive(name, site, at_site[name], sent, at_site, step)
                added[name] = delta if keep is None else delta * keep.to(delta)
        return added

    def _logits(self, input_ids: torch.LongTensor, kwargs, step: Step, text: tuple | None = None,
                logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """The merged next-token logits (log-probabilities with heads mean | router) at the positions
        `logits_to_keep` names; `kwargs(name)` gives the keyword arguments of one source's forward, `text` the
        target's tokens so far and their attention mask (for senders that read with their own tokenizer)."""
        cfg = self.config
        read, keep = {}, None
        for n in senders(cfg):
            if n in cfg.own_tokenizers:
                read[n], where = self._read(n, text, input_ids.shape[-1])
                keep = where if keep is None else keep & where
        keep = keep[..., None].to(input_ids.device) if keep is not None else None
        mixing, receiving = cfg.heads != "target", receivers(cfg)

        def forward(name: str):
            source, kept_here = self.sources[name], {"logits_to_keep": logits_to_keep} if self.keeps_logits[name] else {}
            if name not in receiving:
                return lambda: source(input_ids=input_ids, **kwargs(name))  # stopped at its last site
            if mixing:  # heads.py applies the head
                return lambda: run_to_head(source, input_ids, check=not self.heads[name].checked, **kwargs(name),
                                           **kept_here)
            return lambda: source(input_ids=input_ids, **kwargs(name), **kept_here).logits

        last = {}  # every source's residual at the last site: the router's input

        def exchange(site, at_site):
            if site == cfg.n_sites - 1:
                last.update(at_site)
            return self._exchange(site, at_site, read, keep, step)

        outputs = in_lockstep({n: Run(forward(n), self.sites[n], whole=n in receiving) for n in runs(cfg)}, exchange)
        if not mixing:
            logits = outputs[cfg.target]
            return logits if self.keeps_logits[cfg.target] else logits[:, kept(logits_to_keep)]
        hidden = {}
        for n in cfg.names:
            hidden[n], own_logits = outputs[n]
            if own_logits is not None:
                self.heads[n].check(hidden[n][:, -1:], own_logits)
            if not self.keeps_logits[n]:
                hidden[n] = hidden[n][:, kept(logits_to_keep)]
        if cfg.heads == "router":
            weights = self.router(scaled_residuals(self.saes[-1], cfg.names, last, self.router))
            weights = weights[:, kept(logits_to_keep)].log_softmax(-1)
        else:
            positions = hidden[cfg.names[0]].shape[:2]
            weights = torch.full((*positions, len(cfg.names)), -math.log(len(cfg.names)))
        return mixed_log_probs(weights, [hidden[n] for n in cfg.names], [self.heads[n] for n in cfg.names])

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: MergedCache | None = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                past_key_values: MergedCache | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """`cache` (or `past_key_values`, its name before transformers 5.24): a MergedCache (`new_cache()`), made
        here when `use_cache` is set and none is given. `logits_to_keep` as in transformers' models: logits for
        the last n positions only (0: all), or for these indices; `generate` asks for the last one."""
        cache = given_cache(cache if cache is not None else past_key_values, kwargs)
        if input_ids.shape[-1] == 0:  # no tokens, no logits (the sources' own forwards fail on an empty sequence)
            head = self.get_output_embeddings().weight
            return CausalLMOutputWithPast(logits=head.new_zeros(*input_ids.shape, len(head)), **{OUTPUT_CACHE: cache})
        if cache is None and use_cache:
            cache = self.new_cache()

        text = None
        if self._reads_text():  # the target's tokens so far, which such a sender reads again in its own
            text = (input_ids, attention_mask)
            if cache is not None:
                history = cache.caches["ids"].layers[0]
                history.update(input_ids[:, None, :, None], input_ids[:, None, :, None])
                text = (history.keys[:, 0, :, 0], attention_mask)

        def source_kwargs(name: str) -> dict:
            kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": cache is not None}
            if cache is not None:
                kwargs[self.cache_arguments[name]] = cache.caches[f"source:{name}"]
            return kwargs

        with onloaded([*self.bridge.modules().values(), self.router]):
            step = Step(attention_mask, cache.caches["bridge"].layers if cache is not None and "bridge" in cache.caches
                        else [])
            logits = self._logits(input_ids, source_kwargs, step, text, logits_to_keep)
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels[:, kept(logits_to_keep)], normalized=self.config.heads != "target")
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE: cache})


def kept(logits_to_keep: int | torch.Tensor) -> slice | torch.Tensor:
    """The positions `logits_to_keep` names, as transformers' models read it."""
    return slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep


def register_auto_classes() -> None:
    AutoConfig.register(SAEMergedConfig.model_type, SAEMergedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SAEMergedConfig, SAEMergedForCausalLM, exist_ok=True)


# Saving copies this file and its relative imports into the folder and writes `auto_map` into config.json, so
# `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where saemerge is not installed.
SAEMergedConfig.register_for_auto_class()
SAEMergedForCausalLM.register_for_auto_class("AutoModelForCausalLM")
