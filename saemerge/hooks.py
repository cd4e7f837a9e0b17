"""Forward hooks on the residual stream of any Hugging Face causal LM.

`layer: i` names the output of decoder block i. For every block but the last this equals
`model(..., output_hidden_states=True).hidden_states[i + 1]`; the last entry of `hidden_states` has the
final norm applied in most families, the hooked block output does not.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the ModuleList whose length is the text config's layer count.

    Found by shape, not by a table of families, so it works for GPT-2 (`transformer.h`), Llama/Gemma/Qwen
    (`model.layers`), GPT-NeoX (`gpt_neox.layers`), OPT (`model.decoder.layers`) and the like.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    try:
        root = model.get_decoder() or model
    except (AttributeError, NotImplementedError):
        root = model
    prefix = next((n for n, m in model.named_modules() if m is root), "")
    candidates = [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
        and len({type(block) for block in module}) == 1
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: found no list of {n_layers} decoder blocks")
    name, blocks = candidates[0]
    return ".".join(p for p in (prefix, name) if p), blocks


def resolve_layer(model: nn.Module, layer: int | str) -> str:
    """Turn `layer` (a block index or a module path) into a module path, checking that it exists."""
    if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
        path, blocks = find_blocks(model)
        index = int(layer)
        if not 0 <= index < len(blocks):
            raise ValueError(f"block index {index} is out of range; expected 0..{len(blocks) - 1}")
        return f"{path}.{index}"
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"no module '{layer}' in {type(model).__name__}") from None
    return layer


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed layer has run."""


class ResidualHook:
    """A forward hook on one module's output in one of three modes.

    capture: keep the output in `.captured`; replace: splice `sae(output)` in; inject: add `vector`
    (a tensor, or a function of the output). Detaching restores the model exactly.
    """

    def __init__(self, model: nn.Module, layer: int | str, mode: str = "capture", *,
                 sae: nn.Module | None = None, vector: torch.Tensor | Callable | None = None):
        if mode not in ("capture", "replace", "inject"):
            raise ValueError(f"mode must be capture, replace or inject, got {mode!r}")
        if mode == "replace" and sae is None:
            raise ValueError("replace mode needs an sae")
        if mode == "inject" and vector is None:
            raise ValueError("inject mode needs a vector")
        self.path = resolve_layer(model, layer)
        self.module = model.get_submodule(self.path)
        self.mode, self.sae, self.vector = mode, sae, vector
        self.captured: torch.Tensor | None = None
        self._handle = None

    def attach(self) -> "ResidualHook":
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "ResidualHook":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, module, args, output):
        # Blocks return a tensor in transformers 5 and a tuple (hidden, ...) in older or custom code.
        hidden = output[0] if isinstance(output, tuple) else output
        if self.mode == "capture":
            self.captured = hidden
            return None
        if self.mode == "replace":
            new = self.sae(hidden).to(hidden.dtype)
        else:
            vector = self.vector(hidden) if callable(self.vector) else self.vector
            new = hidden + vector.to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new


def run_to_layers(model: nn.Module, layers: list[int | str], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, **forward_kwargs) -> list[torch.Tensor]:
    """Residual streams at `layers`, running the model only until the last of them has run (no LM head).
    `forward_kwargs` go to the model (position_ids, past_key_values: a KV cache fills up to the last layer)."""
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if len(captured) == len(layers):
                raise StopForward
        return hook

    modules = [model.get_submodule(resolve_layer(model, layer)) for layer in layers]
    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(modules)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **{"use_cache": False, **forward_kwargs})
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) < len(layers):
        raise RuntimeError(f"layers {[l for i, l in enumerate(layers) if i not in captured]!r} did not run")
    return [captured[i] for i in range(len(layers))]


def run_to_layer(model: nn.Module, layer: int | str, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Residual stream at `layer`, running the model only that far (no later blocks, no LM head)."""
    return run_to_layers(model, [layer], input_ids, attention_mask)[0]


def run_to_head(model: nn.Module, input_ids: torch.Tensor, check: bool = False, **forward_kwargs
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input of the model's output head (its last hidden state, final norm applied, at the positions it would
    give logits for), without running the head over them (heads.py does, a few at a time). With `check`, also
    the model's own logits at the last position, to check a head applied outside against once."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        if not check:
            raise StopForward
        return (args[0][:, -1:], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        logits = model(input_ids=input_ids, **forward_kwargs).logits
    except StopForward:
        logits = None
    finally:
        handle.remove()
    return captured[0], logits
