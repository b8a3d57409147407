"""Generic access to a causal LM's decoder blocks, modules and weights, for every family.

Model families are described by data: :data:`FAMILY_SPECS` maps a ``config.model_type`` to a
:class:`FamilySpec` (layer list, final norm, unembedding, named modules, weight layout).
A family that is not in the table falls back to discovery: the decoder blocks are the
``nn.ModuleList`` whose length is ``config.num_hidden_layers``. Specs are checked against
discovery when they are resolved, so a spec that no longer matches ``transformers`` fails
loudly instead of silently hooking the wrong module.

Example:
    >>> import sys; sys.path.insert(0, "tests")
    >>> from conftest import make_model
    >>> arch = get_architecture(make_model("gpt2"))
    >>> arch.num_layers, arch.layer_name(1)
    (3, 'transformer.h.1')
    >>> sorted(arch.weight_modules(1))[:2]
    ['transformer.h.1.attn.c_attn', 'transformer.h.1.attn.c_proj']
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = [
    "FAMILY_SPECS",
    "FamilySpec",
    "ModelArchitecture",
    "StopForward",
    "get_architecture",
    "in_features",
    "is_conv1d",
    "is_weight_module",
    "out_features",
    "trace_layer_outputs",
    "weight_out_in",
]


@dataclass(frozen=True)
class FamilySpec:
    """Where things live in one model family (names relative to the model / to a block)."""

    model_type: str
    layers: str
    final_norm: str
    unembedding: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    #: role -> module path relative to one decoder block, in forward order
    modules: Mapping[str, str] = field(default_factory=dict)
    fused_qkv: bool = False
    #: GPT-2's ``Conv1D`` stores weights as ``in x out``; everything else is ``nn.Linear``.
    conv1d: bool = False
    #: attention and MLP read the same input (GPT-J / CodeGen, optionally StableLM).
    parallel_residual: bool = False


_LLAMA_LIKE_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}

#: The table of supported families. Add a family by adding a row.
FAMILY_SPECS: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(
        "gpt2", layers="transformer.h", final_norm="transformer.ln_f", attention="attn",
        modules={"c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"},
        fused_qkv=True, conv1d=True,
    ),
    "codegen": FamilySpec(
        "codegen", layers="transformer.h", final_norm="transformer.ln_f", attention="attn",
        modules={"qkv_proj": "attn.qkv_proj", "out_proj": "attn.out_proj", "fc_in": "mlp.fc_in", "fc_out": "mlp.fc_out"},
        fused_qkv=True, parallel_residual=True,
    ),
    "llama": FamilySpec("llama", layers="model.layers", final_norm="model.norm", modules=_LLAMA_LIKE_MODULES),
    "stablelm": FamilySpec("stablelm", layers="model.layers", final_norm="model.norm", modules=_LLAMA_LIKE_MODULES),
    "gemma": FamilySpec("gemma", layers="model.layers", final_norm="model.norm", modules=_LLAMA_LIKE_MODULES),
}


# -- weights ---------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` (weight stored ``in x out``). Decided by type, never shape."""
    return isinstance(module, Conv1D)


def is_weight_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as an ``out x in`` view (a transpose view for ``Conv1D``)."""
    if is_conv1d(module):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D module")


def out_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[0]


def in_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[1]


# -- resolution ------------------------------------------------------------------------------
def _discover_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of length "
            f"num_hidden_layers={n}. Add a FamilySpec for model_type {model.config.model_type!r} "
            "to mg_editing.architecture.FAMILY_SPECS."
        )
    return candidates[0]


def _discover_final_norm(model: nn.Module, layers_name: str) -> str:
    parent = layers_name.rsplit(".", 1)[0] if "." in layers_name else ""
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[0] == parent and name != layers_name and "norm" in type(mod).__name__.lower():
            return name
    raise ValueError(f"cannot find the final norm of {type(model).__name__}; add a FamilySpec for it")


class ModelArchitecture:
    """A model instance seen through its family spec: blocks, final norm, unembedding, weights."""

    def __init__(self, model: nn.Module, spec: FamilySpec, discovered: bool = False):
        self.model = model
        self.spec = spec
        self.discovered = discovered
        self.layers: nn.ModuleList = model.get_submodule(spec.layers)
        self.final_norm: nn.Module = model.get_submodule(spec.final_norm)
        self.unembedding: nn.Module = model.get_output_embeddings() or model.get_submodule(spec.unembedding)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int) -> str:
        self.check_layer(index)
        return f"{self.spec.layers}.{index}"

    def check_layer(self, index: int) -> int:
        if not -self.num_layers <= index < self.num_layers:
            raise ValueError(f"layer {index} out of range: the model has {self.num_layers} layers")
        return index % self.num_layers

    def weight_modules(self, layer: int | None = None) -> dict[str, nn.Module]:
        """Full name -> Linear/Conv1D module, in one decoder block or (``None``) in all blocks."""
        indices = range(self.num_layers) if layer is None else [self.check_layer(layer)]
        out = {}
        for i in indices:
            prefix = f"{self.spec.layers}.{i}"
            for name, mod in self.layers[i].named_modules():
                if is_weight_module(mod):
                    out[f"{prefix}.{name}"] = mod
        return out

    def module(self, name: str) -> nn.Module:
        """A weight module by full name, with a clear error listing what exists."""
        modules = self.weight_modules()
        if name not in modules:
            layer_of = ".".join(name.split(".")[: self.spec.layers.count(".") + 2])
            nearby = [n for n in modules if n.startswith(layer_of)] or list(modules)[:8]
            raise KeyError(f"no linear module {name!r} in {type(self.model).__name__}; modules there include {nearby}")
        return modules[name]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logit lens: the model's own final norm and unembedding applied to a residual state."""
        return self.unembedding(self.final_norm(hidden))

    def lens_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(hidden).float(), dim=-1)

    def __repr__(self) -> str:
        how = "discovered" if self.discovered else "spec"
        return f"ModelArchitecture({self.spec.model_type!r}, {how}, layers={self.spec.layers!r} x {self.num_layers})"


def get_architecture(model: nn.Module) -> ModelArchitecture:
    """Resolve ``model``'s family spec (or discover one) and check it against the model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise TypeError(f"{type(model).__name__} has no `config.model_type`; pass a transformers causal LM")
    base = getattr(model, "get_base_model", None)
    if callable(base) and base() is not model:  # a PeftModel: look at the wrapped model
        model = base()
    layers_name, layers = _discover_layers(model)
    spec = FAMILY_SPECS.get(model_type)
    if spec is None:
        spec = FamilySpec(model_type, layers=layers_name, final_norm=_discover_final_norm(model, layers_name))
        return ModelArchitecture(model, spec, discovered=True)
    try:
        spec_layers = model.get_submodule(spec.layers)
        model.get_submodule(spec.final_norm)
    except AttributeError as err:
        raise ValueError(f"the {model_type!r} spec no longer matches {type(model).__name__}: {err}") from err
    if spec_layers is not layers:
        raise ValueError(f"the {model_type!r} spec names {spec.layers!r} as the blocks, discovery found {layers_name!r}")
    block = spec_layers[0]
    for role, path in spec.modules.items():
        try:
            mod = block.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"the {model_type!r} spec's module {role!r} ({path}) is missing: {err}") from err
        if is_conv1d(mod) != spec.conv1d:
            raise ValueError(f"the {model_type!r} spec says conv1d={spec.conv1d} but {path} is {type(mod).__name__}")
    return ModelArchitecture(model, spec)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, when nothing after that point is needed."""


@contextlib.contextmanager
def trace_layer_outputs(arch: ModelArchitecture, *, stop_after: int | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream after every decoder block (before the final norm).

    Yields a dict ``{-1: embeddings output, i: output of block i}`` filled during the
    forward passes run inside the ``with``. With ``stop_after=i`` only blocks ``0..i`` are
    hooked and the forward is ended after block ``i`` by :class:`StopForward`, which the
    caller catches around its forward call. Hooks are always removed on exit.
    """
    store: dict[int, torch.Tensor] = {}
    handles = []
    last = arch.num_layers - 1 if stop_after is None else arch.check_layer(stop_after)

    def first_input(_module, args, kwargs):
        store[-1] = args[0] if args else kwargs.get("hidden_states")

    def save(index):
        def hook(_module, _args, output):
            store[index] = output[0] if isinstance(output, (tuple, list)) else output
            if index == stop_after:
                raise StopForward

        return hook

    try:
        handles.append(arch.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
        for i in range(last + 1):
            handles.append(arch.layers[i].register_forward_hook(save(i)))
        yield store
    finally:
        for h in handles:
            h.remove()
