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

import importlib
import inspect
import json
import math
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .hooks import ResidualHook, run_to_layers
from .sae import SAEConfig, SparseAutoencoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Small text files of a merge that travel with the model through from_pretrained / save_pretrained / push_to_hub.
MERGE_FILES = ("README.md", "recipe.yaml", "metrics.json", "eval_results.json", "report.md")
# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (in forwards and in outputs, the old name
# deprecated); read the name off the installed release rather than off its version number.
OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(model: nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache (`cache`, or `past_key_values` before 5.24 and in
    remote code written for it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def optional_file(repo: str, name: str, **hub) -> str | None:
    """A file of a local folder or a Hub repo, or None if there is no such file."""
    if Path(repo).is_dir():
        return str(Path(repo) / name) if (Path(repo) / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo, name, **hub)
    except EntryNotFoundError:
        return None


def load_pretrained_source(model: str, revision: str | None = None, gguf_file: str | None = None,
                           adapter: str | None = None, dtype: str | torch.dtype = "float32",
                           trust_remote_code: bool = False,
                           device_map: str | None = None, allow_pickle: bool = False) -> PreTrainedModel:
    """A source causal LM in eval mode, frozen, its LoRA adapter merged in; weights from safetensors or GGUF,
    pickles only with `allow_pickle` (loading one can run code). Lives here so that a merged folder stored by
    reference can load its sources without saemerge."""
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "device_map": device_map}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        source = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES.get(dtype, dtype), **kwargs)
    except OSError as e:
        # transformers' "no model.safetensors (...) do not set use_safetensors=True": say what it means here.
        if "use_safetensors" in kwargs and ("use_safetensors" in str(e) or "named model.safetensors" in str(e)):
            raise OSError(f"'{model}' has no *.safetensors weights; expected safetensors (if it holds pickle "
                          "weights such as pytorch_model.bin and you trust them, pass --allow-pickle / "
                          "allow_pickle=True)") from e
        raise
    if getattr(source, "hf_quantizer", None) is not None and gguf_file:
        # GGUF weights arrive dequantized, yet later transformers releases keep a GGUF quantizer that refuses to save
        # or train the model: drop it (the quantizer's own method) so the merged model saves like any other.
        source.hf_quantizer.remove_quantization_config(source)
    if adapter:
        from huggingface_hub import snapshot_download

        peft = importlib.import_module("peft")  # needed only for adapters, so the folder's code does not require it
        # Fetch only the safetensors file unless pickles are allowed: peft itself would fall back to a pickled
        # adapter_model.bin.
        files = ["adapter_config.json", "adapter_model.safetensors"] + (["adapter_model.bin"] if allow_pickle else [])
        folder = adapter if Path(adapter).is_dir() else snapshot_download(adapter, allow_patterns=files)
        if not allow_pickle and not (Path(folder) / "adapter_model.safetensors").is_file():
            raise OSError(f"adapter '{adapter}' has no adapter_model.safetensors; expected safetensors (if it holds "
                          "a pickled adapter_model.bin and you trust it, pass --allow-pickle / allow_pickle=True)")
        source = peft.PeftModel.from_pretrained(source, folder).merge_and_unload()
    source.requires_grad_(False)
    return source.eval()


class MergedCache(Cache):
    """The merged model's KV cache: one DynamicCache per source run, keyed "send:NAME" (a source run up to its
    layer) or "receive:NAME" (run whole); a source that does both keeps two, since the same tokens pass its early
    blocks twice. To `generate` it is one transformers `Cache` whose layers are all of theirs, so what generate does
    to a cache (reorder for beam search, select, crop, ...) is the Cache API's own code reaching every source."""

    def __init__(self, caches: dict[str, DynamicCache]):
        self.caches = caches
        # DynamicCache(config=...) makes its layers up front, so this list is complete from the start.
        super().__init__(layers=[layer for cache in caches.values() for layer in cache.layers])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Every run sees the same tokens; a sender's cache is filled only up to its layer, so take the longest.
        return max(cache.get_seq_length(layer_idx) for cache in self.caches.values())

    @property
    def is_compileable(self) -> bool:
        return False  # several caches under hooks: generate must not compile the forward


class SAEMergedConfig(PretrainedConfig):
    model_type = "saemerge"

    def __init__(self, sources: list[dict] | None = None, target: str | None = None, inject: list[str] | None = None,
                 combine: str = "mean", scale: float = 1.0, heads: str = "target", gates: list[str] | None = None,
                 latent: dict | None = None, storage: str = "self-contained", **kwargs):
        # sources: [{"name", "config": the source's config dict, "layers": module paths, "d_model",
        #            "reference": load_pretrained_source's arguments (model id or path, revision, ...)}]
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
            # In the default dtype, which from_pretrained sets to its `dtype` (the sources' configs name their own).
            sources = {s["name"]: AutoModelForCausalLM.from_config(config.source_config(s["name"]),
                                                                   dtype=torch.get_default_dtype())
                       for s in config.sources}
        if saes is None:
            saes = [{s["name"]: SparseAutoencoder(SAEConfig(d_in=s["d_model"], **config.latent)) for s in config.sources}
                    for _ in range(config.n_sites)]
        sites = range(config.n_sites)
        # Registered before the sources: device_map="auto" fills devices in this order, so these small modules land
        # on the first device and what overflows (onto later devices, CPU or disk) is the sources' later blocks.
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
        self.sources = nn.ModuleDict(sources)
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

    def calibration_parameters(self) -> list[nn.Parameter]:
        """What calibration trains: gates and router (sources and SAEs stay frozen)."""
        modules = [self.latent_gates, self.token_gates] + ([self.router] if self.router is not None else [])
        return [p for m in modules for p in m.parameters()]

    # --- the merge ------------------------------------------------------------------------------------------
    def _features(self, site: int, residuals: dict[str, torch.Tensor], reader: nn.Linear) -> torch.Tensor:
        """Every source's residual at one site, each divided by its SAE's scale, side by side, on the device and in
        the dtype of the gate or router that reads them (a device map may put sources elsewhere)."""
        sae = self.saes[site]
        return torch.cat([(residuals[n].to(sae[n].act_scale) / sae[n].act_scale).to(reader.weight)
                          for n in self.config.names], dim=-1)

    def injected(self, receiver: str, site: int, h: torch.Tensor, codes: dict[str, torch.Tensor],
                 residuals: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """What is added to `receiver`'s residual stream h at one site, given the other sources' codes there
        (codes and residuals: {source: tensor} at that site)."""
        sae = self.saes[site][receiver]
        senders = self.config.senders_to(receiver)
        # Codes go to the receiver's SAE and the result back to h (a device map may spread them over devices).
        sent = [codes[a].to(sae.W_dec) for a in senders]
        if self.config.combine == "sum":
            code = sum(sent)
        else:
            # Biases cancel in the difference of two reconstructions, so decode the code difference alone.
            z_r = codes[receiver].to(sae.W_dec) if receiver in codes else sae.encode(h)
            code = sum(z - z_r for z in sent) / (len(senders) + 1)
        if receiver in self.latent_gates[site]:
            code = code * 2 * torch.sigmoid(self.latent_gates[site][receiver]).to(code)
        delta = sae.decode(code, bias=False)
        if receiver in self.token_gates[site]:
            gate = self.token_gates[site][receiver]
            delta = delta * 2 * torch.sigmoid(gate(self._features(site, {**residuals, receiver: h}, gate))).to(delta)
        return self.config.scale * delta.to(h)

    def _send_runs(self) -> list[str]:
        """The sources that run up to their last layer before any receiver runs, so that their codes can be sent.
        Receivers that also send run twice up to it (simple, not free). A receiver that sends nothing runs there too
        only when its un-injected codes are needed at a later site (combine: mean, several sites): at the first
        site its stream is the one its receiving run injects into."""
        cfg = self.config
        if cfg.scale == 0:
            return []
        if cfg.heads != "target" or (cfg.combine == "mean" and cfg.n_sites > 1):
            return list(cfg.names)
        return [n for n in cfg.names if n in cfg.senders_to(cfg.target)]

    def new_cache(self) -> MergedCache:
        """An empty KV cache: one DynamicCache for each source run this wiring makes."""
        runs = [("send", n) for n in self._send_runs()] + [("receive", n) for n in self.config.receivers]
        return MergedCache({f"{role}:{name}": DynamicCache(config=self.sources[name].config.get_text_config(decoder=True))
                            for role, name in runs})

    def _residuals(self, names, input_ids, run) -> list[dict[str, torch.Tensor]]:
        """Run each named source up to its last layer only; residuals per site."""
        runs = {n: run_to_layers(self.sources[n], self.layers[n], input_ids, **run("send", n)) for n in names}
        return [{n: runs[n][site] for n in names} for site in range(self.config.n_sites)]

    def _run_receiver(self, name, input_ids, run, codes, residuals):
        """A full forward of source `name`, receiving the others' features at its layers (if any).
        Returns its logits and its residual at the last site (the router's input)."""
        model = self.sources[name]
        if self.config.scale == 0 or not self.config.senders_to(name):
            with ResidualHook(model, self.layers[name][-1], "capture") as hook:
                logits = model(input_ids=input_ids, **run("receive", name)).logits
            return logits, hook.captured
        with ExitStack() as hooks:
            for site, layer in enumerate(self.layers[name]):
                hooks.enter_context(ResidualHook(model, layer, "inject", vector=lambda h, site=site: self.injected(
                    name, site, h, codes[site], residuals[site])))
            logits = model(input_ids=input_ids, **run("receive", name)).logits
        return logits, residuals[-1].get(name)

    def _onload(self) -> ExitStack:
        """Brings the SAEs, gates and router that a device map offloaded (to CPU or disk) onto their execution
        device for one forward: the merge calls their methods, and accelerate's offload hooks watch forward only."""
        stack = ExitStack()
        parts = [part for module in (self.saes, self.latent_gates, self.token_gates, self.router) if module is not None
                 for part in module.modules()]
        if any(p.device.type == "meta" for part in parts for p in part.parameters(recurse=False)):
            from accelerate.utils import align_module_device, has_offloaded_params

            for part in parts:
                if has_offloaded_params(part):
                    stack.enter_context(align_module_device(part))
        return stack

    def _logits(self, input_ids: torch.LongTensor, run) -> torch.Tensor:
        """The merged next-token logits; `run(role, name)` gives the keyword arguments of one source's run."""
        cfg = self.config
        residuals = self._residuals(self._send_runs(), input_ids, run)
        codes = [{n: self.saes[site][n].encode(h) for n, h in at_site.items()} for site, at_site in enumerate(residuals)]
        if cfg.heads == "target":
            return self._run_receiver(cfg.target, input_ids, run, codes, residuals)[0]
        outputs = {n: self._run_receiver(n, input_ids, run, codes, residuals) for n in cfg.names}
        if cfg.heads == "router":
            features = self._features(cfg.n_sites - 1, {n: outputs[n][1] for n in cfg.names}, self.router)
            weights = self.router(features).log_softmax(-1)
        else:
            weights = torch.full((*input_ids.shape, len(cfg.names)), -math.log(len(cfg.names)))
        # log of the mixed distribution (softmax(logits) is the mixture), in float32 whatever the sources' dtype
        # (a 16-bit log-softmax loses the small probabilities the mixture adds up), one source at a time: pairwise
        # logaddexp is several times faster than logsumexp over a stacked [S, B, T, V] tensor, and without
        # autograd (inference) it works in place, holding one vocabulary-sized tensor per source less.
        in_place = not torch.is_grad_enabled()
        logits = None
        for i, n in enumerate(cfg.names):
            log_probs = outputs.pop(n)[0].float().log_softmax(-1)
            weight = weights[..., i, None].to(log_probs.device, torch.float32)  # sources may sit elsewhere
            log_probs = log_probs.add_(weight) if in_place else log_probs + weight
            logits = log_probs if logits is None else torch.logaddexp(logits, log_probs, out=logits if in_place else None)
        return logits

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: MergedCache | None = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                past_key_values: MergedCache | None = None, **kwargs) -> CausalLMOutputWithPast:
        """`cache` (or `past_key_values`, its name before transformers 5.24): a MergedCache (`new_cache()`), made
        here when `use_cache` is set and none is given."""
        cache = cache if cache is not None else past_key_values
        if unknown := [k for k, v in kwargs.items() if isinstance(v, Cache)]:
            # Running without a cache handed over under a new name gives other tokens, silently: refuse instead.
            raise TypeError(f"{type(self).__name__}.forward got a KV cache as {unknown}; it takes it as `cache` "
                            "(or `past_key_values`)")
        if cache is not None and not isinstance(cache, MergedCache):
            raise TypeError(f"the KV cache of a merged model is a MergedCache (model.new_cache()), not a {type(cache).__name__}")
        if input_ids.shape[-1] == 0:  # no tokens, no logits (the sources' own forwards fail on an empty sequence)
            head = self.get_output_embeddings().weight
            return CausalLMOutputWithPast(logits=head.new_zeros(*input_ids.shape, len(head)), **{OUTPUT_CACHE: cache})
        if cache is None and use_cache:
            cache = self.new_cache()

        def run(role: str, name: str) -> dict:
            """Arguments of one source's run; `role` (send/receive) picks its cache."""
            kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": cache is not None}
            if cache is not None:
                kwargs[self.cache_arguments[name]] = cache.caches[f"{role}:{name}"]
            return kwargs

        with self._onload():
            logits = self._logits(input_ids, run)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE: cache})

    # --- files ----------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers does (safetensors, sharded past `max_shard_size` with an index), plus this folder's
        code (for `trust_remote_code` without saemerge) and the merge's text files. Stored by reference, the
        sources' weights stay out."""
        if self.config.storage == "reference" and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if not k.startswith("sources.")}
        super().save_pretrained(save_directory, *args, **kwargs)
        for name, text in self.merge_files.items():
            (Path(save_directory) / name).write_text(text)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        allow_pickle = kwargs.pop("allow_pickle", False)  # for sources stored by reference; never from the config
        if not isinstance(config, PretrainedConfig):
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub)
        if config.storage == "reference":
            model = cls._from_references(pretrained_model_name_or_path, config, hub, kwargs.get("device_map"),
                                         kwargs.get("dtype"), allow_pickle)
        else:
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        for name in MERGE_FILES:
            if path := optional_file(pretrained_model_name_or_path, name, **hub):
                model.merge_files[name] = Path(path).read_text()
        return model

    @classmethod
    def _from_references(cls, folder, config, hub: dict, device_map: str | None, dtype: str | torch.dtype | None,
                         allow_pickle: bool = False):
        """Sources fetched (or found locally) by their ids; SAEs, gates and router from the folder. `dtype` (unless
        None or "auto": each source in its recorded dtype, the rest as saved) applies to all of them."""
        from safetensors.torch import load_file

        dtype = DTYPES.get(dtype, dtype) if dtype != "auto" else None
        sources = {}
        for s in config.sources:
            reference = {**s["reference"], **({"dtype": dtype} if dtype is not None else {})}
            try:
                sources[s["name"]] = load_pretrained_source(**reference, device_map=device_map,
                                                            allow_pickle=allow_pickle)
            except OSError as e:
                raise OSError(f"{folder} is stored by reference and its source '{s['name']}' ({s['reference']['model']}) "
                              f"cannot be loaded: {str(e).strip().splitlines()[0]}") from e
        model = cls(config, sources=sources)
        if dtype is not None:
            for name, module in model.named_children():
                if name != "sources":
                    module.to(dtype)
        index = optional_file(folder, "model.safetensors.index.json", **hub)
        files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if index else ["model.safetensors"]
        state = {}
        for name in files:
            if not (path := optional_file(folder, name, **hub)):
                raise OSError(f"{folder} has no {name}")
            state.update(load_file(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        wrong = [k for k in missing if not k.startswith("sources.")] + list(unexpected)
        if wrong:
            raise ValueError(f"{folder}: weights do not match the config: {wrong[:5]}")
        return model.eval()

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload merged model (saemerge)", max_shard_size: str | int = "5GB",
                    revision: str | None = None, create_pr: bool = False, **kwargs):
        """Save into a temporary folder (weights, code, the merge's model card and files) and upload it."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            if "README.md" not in self.merge_files:
                (Path(folder) / "README.md").write_text(self._card())
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    def _card(self) -> str:
        """A minimal model card for a model that did not come from `saemerge merge` (which writes a full one)."""
        from huggingface_hub import ModelCard, ModelCardData

        bases = [s.get("reference", {}).get("model") or s["name"] for s in self.config.sources]
        data = ModelCardData(base_model=bases, tags=["saemerge", "merge", "sparse-autoencoder"],
                             library_name="transformers", pipeline_tag="text-generation")
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# Merged with saemerge\n\nSources: "
                             + ", ".join(self.config.names) + ".\n"))


def register_auto_classes() -> None:
    AutoConfig.register(SAEMergedConfig.model_type, SAEMergedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SAEMergedConfig, SAEMergedForCausalLM, exist_ok=True)


# Saving copies this file and its relative imports into the folder and writes `auto_map` into config.json, so
# `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where saemerge is not installed.
SAEMergedConfig.register_for_auto_class()
SAEMergedForCausalLM.register_for_auto_class("AutoModelForCausalLM")
