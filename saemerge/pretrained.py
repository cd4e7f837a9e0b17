"""Files of the merged model: its sources loaded by reference, and saving, loading and pushing the merged model
(what transformers does, plus the folder's code, the merge's text files and sources stored by reference)."""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Small text files of a merge that travel with the model through from_pretrained / save_pretrained / push_to_hub.
MERGE_FILES = ("README.md", "recipe.yaml", "metrics.json", "eval_results.json", "report.md")


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


class MergedModelFiles:
    """save_pretrained / from_pretrained / push_to_hub of the merged model class (mixed in before PreTrainedModel)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers does (safetensors, sharded past `max_shard_size` with an index), plus this folder's
        code (for `trust_remote_code` without saemerge) and the merge's text files. Stored by reference, the
        sources' weights stay out."""
        if self.config.storage == "reference" and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if not k.startswith("sources.")}
        super().save_pretrained(save_directory, *args, **kwargs)
        for name, text in self.merge_files.items():
            (Path(save_directory) / name).write_text(text)
        if self.retokenizers:  # a source reads with its own tokenizer: keep it, and the target's it reads from
            tokenizers = {n: r.other for n, r in self.retokenizers.items()}
            tokenizers[self.config.target] = next(iter(self.retokenizers.values())).reference.tokenizer
            for name, tokenizer in tokenizers.items():
                tokenizer.save_pretrained(Path(save_directory) / "tokenizers" / name)

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
        if config.own_tokenizers:
            from transformers import AutoTokenizer

            model.set_tokenizers({n: AutoTokenizer.from_pretrained(pretrained_model_name_or_path,
                                                                   subfolder=f"tokenizers/{n}", **hub)
                                  for n in [config.target, *config.own_tokenizers]})
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
        """Save into a temporary folder (weights, code, the merge's files) and push it as `saemerge push` does,
        with its model card. Without saemerge installed (remote code), transformers' own push."""
        try:
            push = importlib.import_module("saemerge.hub").push  # not a relative import: remote code runs without it
        except ImportError:
            return super().push_to_hub(repo_id, private=private, token=token, commit_message=commit_message,
                                       max_shard_size=max_shard_size, revision=revision, create_pr=create_pr, **kwargs)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            return push(folder, repo_id, private=bool(private), token=token, commit_message=commit_message,
                        revision=revision, create_pr=create_pr)
