"""The merged model: sources side by side, features carried between their residual streams by a bridge.

A forward runs the senders up to their last site (wiring.py), hands their residuals to the bridge (sae_bridge.py),
then runs each receiver whole with what the bridge returns added (times `scale`) at its sites. heads:
  target: only `target` receives, and its head gives the logits;
  mean:   every source receives from all the others; the heads' next-token distributions are averaged;
  router: the same, mixed per token by a learned router over the sources' residuals.
scale = 0 gives the target alone (target), the logit ensemble (mean) or a routed ensemble (router).
A sender may read with a tokenizer of its own (heads: target only): it reads the text of the target's tokens so
far, never more, in its own tokens (retokenize.py), and what it holds after reading up to token t reaches t.
Config: configuration.py; KV cache: cache.py; saving and loading: pretrained.py.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import OUTPUT_CACHE, MergedCache, cache_argument, given_cache
from .configuration import SAEMergedConfig
from .hooks import ResidualHook, run_to_layers
from .pretrained import MergedModelFiles
from .retokenize import Retokenizer, read_prefixes
from .cross_attention_bridge import CrossAttentionBridge
from .linear_bridge import LinearBridge
from .sae import SparseAutoencoder
from .sae_bridge import SAEBridge, Step, scaled_residuals
from .wiring import runs, send_runs, senders_to

# config.bridge -> the class that carries features between the sources
BRIDGES = {"sae": SAEBridge, "linear": LinearBridge, "cross_attention": CrossAttentionBridge}


def mix_heads(log_weights: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
    """log sum_s w_s softmax(logits_s): the log of the mixed next-token distribution, in float32 whatever the
    sources' dtype (a 16-bit log-softmax loses the small probabilities the mixture adds up), one source at a time:
    pairwise logaddexp is several times faster than logsumexp over a stacked [S, B, T, V] tensor, and without
    autograd (inference) it works in place, holding one vocabulary-sized tensor per source less."""
    in_place = not torch.is_grad_enabled()
    mixed = None
    for i in range(len(logits)):
        log_probs = logits[i].float().log_softmax(-1)
        logits[i] = None  # let it go
        weight = log_weights[..., i, None].to(log_probs.device, torch.float32)  # sources may sit elsewhere
        log_probs = log_probs.add_(weight) if in_place else log_probs + weight
        mixed = log_probs if mixed is None else torch.logaddexp(mixed, log_probs, out=mixed if in_place else None)
    return mixed


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
        self.cache_arguments = {name: cache_argument(source) for name, source in sources.items()}
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
        """An empty KV cache: one DynamicCache for each source run this wiring makes, the bridge's own layers, and the
        target's tokens so far if a sender reads them with a tokenizer of its own."""
        caches = {f"{role}:{name}": DynamicCache(config=self.sources[name].config.get_text_config(decoder=True))
                  for role, name in runs(self.config)}
        if self._reads_text():
            caches["ids"] = Cache(layers=[DynamicLayer()])  # kept as a [batch, 1, tokens, 1] "key"
        if self.bridge.cache_layers():
            caches["bridge"] = Cache(layers=[DynamicLayer() for _ in range(self.bridge.cache_layers())])
        return MergedCache(caches)

    def _reads_text(self) -> bool:
        return any(n in self.config.own_tokenizers for n in send_runs(self.config))

    def _read(self, name: str, text: tuple, new: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sender `name`'s residuals at its layers for the last `new` of the target's tokens `text` = (ids so far,
        attention mask), read in its own tokenizer, and where it has read anything."""
        if name not in self.retokenizers:
            raise ValueError(f"source '{name}' reads with a tokenizer of its own: load the model with from_pretrained "
                             "(which loads its tokenizers) or call set_tokenizers() first")
        return read_prefixes(self.sources[name], self.layers[name], self.retokenizers[name], *text, new)

    def _receive(self, name: str, input_ids, run, sent: list[dict], residuals: list[dict], step: Step,
                 keep: torch.Tensor | None = None):
        """A full forward of source `name`, receiving what the bridge carries at its layers (if anything), only
        where `keep` ([batch, tokens, 1]) is 1 if given. Returns its logits and its residual at the last site (the
        router's input)."""
        model = self.sources[name]
        if self.config.scale == 0 or not senders_to(self.config, name):
            with ResidualHook(model, self.layers[name][-1], "capture") as hook:
                return model(input_ids=input_ids, **run("receive", name)).logits, hook.captured
        with ExitStack() as hooks:
            for site, layer in enumerate(self.layers[name]):
                delta = lambda h, site=site: self.config.scale * self.bridge.receive(name, site, h, sent[site],
                                                                                    residuals[site], step)
                if keep is not None:
                    delta = lambda h, inner=delta: inner(h) * keep.to(h)
                hooks.enter_context(ResidualHook(model, layer, "inject", vector=delta))
            return model(input_ids=input_ids, **run("receive", name)).logits, residuals[-1].get(name)

    def _logits(self, input_ids: torch.LongTensor, run, step: Step, text: tuple | None = None) -> torch.Tensor:
        """The merged next-token logits; `run(role, name)` gives the keyword arguments of one source's run, `text`
        the target's tokens so far and their attention mask (for senders that read with their own tokenizer)."""
        cfg = self.config
        senders, by_source, keep = send_runs(cfg), {}, None
        for n in senders:
            if n in cfg.own_tokenizers:
                by_source[n], read = self._read(n, text, input_ids.shape[-1])
                keep = read if keep is None else keep & read
            else:
                by_source[n] = run_to_layers(self.sources[n], self.layers[n], input_ids, **run("send", n))
        residuals = [{n: by_source[n][site] for n in senders} for site in range(cfg.n_sites)]
        sent = [self.bridge.send(site, at_site, step) for site, at_site in enumerate(residuals)]
        if cfg.heads == "target":
            keep = keep[..., None].to(input_ids.device) if keep is not None else None
            return self._receive(cfg.target, input_ids, run, sent, residuals, step, keep)[0]
        outputs = {n: self._receive(n, input_ids, run, sent, residuals, step) for n in cfg.names}
        if cfg.heads == "router":
            last = {n: outputs[n][1] for n in cfg.names}
            weights = self.router(scaled_residuals(self.saes[-1], cfg.names, last, self.router)).log_softmax(-1)
        else:
            weights = torch.full((*input_ids.shape, len(cfg.names)), -math.log(len(cfg.names)))
        return mix_heads(weights, [outputs.pop(n)[0] for n in cfg.names])

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: MergedCache | None = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                past_key_values: MergedCache | None = None, **kwargs) -> CausalLMOutputWithPast:
        """`cache` (or `past_key_values`, its name before transformers 5.24): a MergedCache (`new_cache()`), made
        here when `use_cache` is set and none is given."""
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

        def run(role: str, name: str) -> dict:
            """Arguments of one source's run; `role` (send/receive) picks its cache."""
            kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": cache is not None}
            if cache is not None:
                kwargs[self.cache_arguments[name]] = cache.caches[f"{role}:{name}"]
            return kwargs

        with onloaded([*self.bridge.modules().values(), self.router]):
            step = Step(attention_mask, cache.caches["bridge"].layers if cache is not None and "bridge" in cache.caches
                        else [])
            logits = self._logits(input_ids, run, step, text)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE: cache})


def register_auto_classes() -> None:
    AutoConfig.register(SAEMergedConfig.model_type, SAEMergedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SAEMergedConfig, SAEMergedForCausalLM, exist_ok=True)


# Saving copies this file and its relative imports into the folder and writes `auto_map` into config.json, so
# `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where saemerge is not installed.
SAEMergedConfig.register_for_auto_class()
SAEMergedForCausalLM.register_for_auto_class("AutoModelForCausalLM")
