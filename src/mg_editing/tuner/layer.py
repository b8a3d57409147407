"""``MGEditLayer``: sparse (row / neuron) or dense weight deltas on a Linear or GPT-2 Conv1D.

All deltas are kept in the ``out x in`` convention of :mod:`mg_editing.locations`, whatever the
base layer's storage: GPT-2's ``Conv1D`` stores its weight ``in x out``, so merging transposes,
and the choice is made on the layer type (``is_conv1d``), never on the weight's shape.

The unmerged forward never materialises a weight: it adds the located part of the output,

* row:    ``out[..., rows] += x @ delta.T``          (``k x in`` delta, ``O(k * in)`` per token)
* neuron: ``out[..., rows] += x[..., cols] * delta`` (scatter-add, ``O(n)`` per token)
* dense:  ``out += x @ delta.T``                     (module / layer / full granularity)

Biases are never edited: they pass through the base layer untouched.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from mg_editing.architecture import is_conv1d, is_weight_module

__all__ = ["KINDS", "MGEditLayer", "MGEditLinear", "quantization_problem", "validate_indices"]

KINDS = ("row", "neuron", "dense")

_QUANT_PACKAGES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "torchao", "quanto", "eetq", "aqlm", "fbgemm")


def quantization_problem(module: nn.Module) -> Optional[str]:
    """Why a delta cannot be merged into ``module``'s weight (quantized / integer weights), or ``None``."""
    cls = type(module)
    if any(p in cls.__module__ for p in _QUANT_PACKAGES):
        return f"it is a quantized layer ({cls.__module__}.{cls.__name__})"
    for attr in ("qweight", "W_q", "quant_state", "SCB"):
        if getattr(module, attr, None) is not None:
            return f"it holds quantized weights (`{attr}`)"
    weight = getattr(module, "weight", None)
    if weight is None:
        return "it has no weight"
    wcls = type(weight)
    if wcls.__name__ in ("Int8Params", "Params4bit") or any(p in wcls.__module__ for p in _QUANT_PACKAGES):
        return f"its weight is a quantized {wcls.__name__}"
    if not weight.dtype.is_floating_point:
        return f"its weight has dtype {weight.dtype} (int8/4-bit quantized)"
    if weight.element_size() < 2:
        return f"its weight has the 8-bit float dtype {weight.dtype}"
    return None


def compute_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its weight's device, or, for a weight that accelerate offloaded
    (to the CPU or disk, left on ``meta``), the execution device of its ``AlignDevicesHook``,
    where the weight is brought for each forward. The adapter's deltas live there."""
    device = module.weight.device
    if device.type == "meta":
        execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
    return device


def validate_indices(kind: str, indices: torch.Tensor, count: int, shape: tuple[int, int]) -> Optional[str]:
    """Check row (``k``) or neuron (``2 x n``) indices against an ``out x in`` weight; return the problem."""
    out_features, in_features = shape
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        return f"indices have dtype {indices.dtype}, expected an integer dtype"
    if indices.device.type == "meta":
        return None
    if kind == "row":
        if tuple(indices.shape) != (count,):
            return f"row indices have shape {tuple(indices.shape)}, expected ({count},)"
        rows = indices.long()
        if count and (rows.min() < 0 or rows.max() >= out_features):
            return f"row indices out of range [0, {out_features}): min {int(rows.min())}, max {int(rows.max())}"
        if rows.unique().numel() != count:
            return "row indices contain duplicates"
        return None
    if kind == "neuron":
        if tuple(indices.shape) != (2, count):
            return f"neuron indices have shape {tuple(indices.shape)}, expected (2, {count})"
        rows, cols = indices.long()
        if count and (rows.min() < 0 or rows.max() >= out_features):
            return f"neuron row indices out of range [0, {out_features}): min {int(rows.min())}, max {int(rows.max())}"
        if count and (cols.min() < 0 or cols.max() >= in_features):
            return f"neuron column indices out of range [0, {in_features}): min {int(cols.min())}, max {int(cols.max())}"
        if (rows * in_features + cols).unique().numel() != count:
            return "neuron indices contain duplicate (row, column) pairs"
        return None
    return f"{kind} adapters have no indices"


class MGEditLayer(BaseTunerLayer):
    """Per-adapter deltas on one weight module; see the module docstring for the three kinds."""

    #: trainable: one zero-initialised delta per adapter
    adapter_layer_names = ("mg_edit_delta",)
    #: row / neuron indices (a persistent BufferDict: saved with the deltas) and the kind of each adapter
    other_param_names = ("mg_edit_index", "mg_edit_kind")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mg_edit_delta = nn.ParameterDict({})
        self.mg_edit_index = BufferDict(persistent=True)
        self.mg_edit_kind: dict[str, str] = {}
        # adapters created from a compact config whose indices are still placeholders (filled on load)
        self._mg_edit_pending: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters = []

        base = self.get_base_layer()
        if not is_weight_module(base):
            raise TypeError(f"MG-Editing adapts nn.Linear and transformers Conv1D layers, not {type(base).__name__}")
        problem = quantization_problem(base)
        if problem is not None:
            raise ValueError(f"cannot add an MG-Editing delta to {type(base).__name__}: {problem}; merging is impossible")
        self.is_conv1d = is_conv1d(base)
        weight = base.weight
        self.out_features, self.in_features = (weight.shape[1], weight.shape[0]) if self.is_conv1d else tuple(weight.shape)
        self.kwargs = kwargs

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(out, in)`` of the base weight, whatever its storage layout."""
        return (self.out_features, self.in_features)

    def delta_shape(self, kind: str, count: int) -> tuple[int, ...]:
        return {"row": (count, self.in_features), "neuron": (count,), "dense": (self.out_features, self.in_features)}[kind]

    def update_layer(
        self,
        adapter_name: str,
        kind: str,
        count: int = 0,
        indices: Optional[torch.Tensor] = None,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add adapter ``adapter_name``: a ``kind`` delta over ``count`` located rows / neurons.

        ``indices`` (row: ``k``, neuron: ``2 x n``) may be ``None`` when the adapter comes from a
        compact config: placeholders are created and the real indices are loaded from the adapter file.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown MG-Editing delta kind {kind!r}; expected one of {KINDS}")
        if adapter_name in self.mg_edit_delta:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        weight = self.get_base_layer().weight
        device = compute_device(self.get_base_layer())
        if kind != "dense":
            if indices is None:
                shape = (count,) if kind == "row" else (2, count)
                indices = torch.zeros(shape, dtype=torch.long, device=device)
                self._mg_edit_pending.add(adapter_name)
            else:
                indices = torch.as_tensor(indices).to(device=device)
                problem = validate_indices(kind, indices, count, self.weight_shape)
                if problem:
                    raise ValueError(f"adapter {adapter_name!r}: {problem}")
                indices = indices.long()
            self.mg_edit_index[adapter_name] = indices.contiguous()
        shape = self.delta_shape(kind, count)
        if init_weights:
            delta = torch.zeros(shape, dtype=weight.dtype, device=device)
        else:
            delta = torch.randn(shape, dtype=torch.float32, device="cpu" if device.type == "meta" else device)
            delta = (0.02 * delta).to(device=device, dtype=weight.dtype)
        self.mg_edit_delta[adapter_name] = nn.Parameter(delta)
        self.mg_edit_kind[adapter_name] = kind
        self._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_mg_edit_parameters(self, adapter_name: str) -> None:
        with torch.no_grad():
            self.mg_edit_delta[adapter_name].zero_()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._mg_edit_pending.discard(adapter_name)

    def _check_ready(self, adapter_name: str) -> None:
        if adapter_name in self._mg_edit_pending:
            raise RuntimeError(
                f"MG-Editing adapter {adapter_name!r} was built from a config without indices and its indices were "
                "never loaded. Load it with PeftModel.from_pretrained(base, path), or build it from "
                "MGEditConfig(locations=<Locations with indices>)."
            )


class MGEditLinear(nn.Module, MGEditLayer):
    """MG-Editing on an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``in x out``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        kind: str,
        count: int = 0,
        indices: Optional[torch.Tensor] = None,
        init_weights: bool = True,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        MGEditLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, kind, count, indices, init_weights=init_weights, inference_mode=inference_mode)

    # -- weights ---------------------------------------------------------------------------
    def _out_in_view(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.is_conv1d else weight

    def _delta_out_in(self, adapter: str) -> torch.Tensor:
        """The adapter's dense ``out x in`` delta (differentiable)."""
        delta = self.mg_edit_delta[adapter]
        kind = self.mg_edit_kind[adapter]
        if kind == "dense":
            return delta
        dense = torch.zeros(self.weight_shape, dtype=delta.dtype, device=delta.device)
        index = self.mg_edit_index[adapter]
        if kind == "row":
            return dense.index_add(0, index, delta)
        return dense.index_put((index[0], index[1]), delta, accumulate=True)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense delta in the base weight's own layout and dtype (``in x out`` for Conv1D)."""
        self._check_ready(adapter)
        delta = self._delta_out_in(adapter).to(self.get_base_layer().weight.dtype)
        return delta.t().contiguous() if self.is_conv1d else delta

    @torch.no_grad()
    def _apply_delta(self, weight: torch.Tensor, adapter: str, sign: float) -> None:
        view = self._out_in_view(weight)
        delta = self.mg_edit_delta[adapter].detach().to(weight.dtype)
        kind = self.mg_edit_kind[adapter]
        if kind == "dense":
            view.add_(delta, alpha=sign)
        elif kind == "row":
            view.index_add_(0, self.mg_edit_index[adapter], delta, alpha=sign)
        else:
            index = self.mg_edit_index[adapter]
            view.index_put_((index[0], index[1]), delta * sign, accumulate=True)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or the named) adapters' deltas into the base weight, in place.

        Args:
            safe_merge: merge into a copy first and refuse (``ValueError``) if it has NaN/inf.
            adapter_names: adapters to merge (default: the active ones).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if base.weight.device.type == "meta":
            raise ValueError(
                "cannot merge into a layer whose weight is offloaded (device_map with 'disk' or CPU offload): "
                "load the base model without offloading to merge, or keep the adapter unmerged"
            )
        for adapter in adapter_names:
            if adapter not in self.mg_edit_delta:
                continue
            self._check_ready(adapter)
            if safe_merge:
                merged = base.weight.data.clone()
                self._apply_delta(merged, adapter, 1.0)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base.weight.data.copy_(merged)
            else:
                self._apply_delta(base.weight.data, adapter, 1.0)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged deltas again (exact up to float rounding of w + d - d)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.mg_edit_delta:
                self._apply_delta(base.weight.data, adapter, -1.0)

    # -- forward ---------------------------------------------------------------------------
    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter: str) -> torch.Tensor:
        delta = self.mg_edit_delta[adapter]
        x = self._cast_input_dtype(x, delta.dtype)
        kind = self.mg_edit_kind[adapter]
        if kind == "dense":
            return result + F.linear(x, delta).to(result.dtype)
        index = self.mg_edit_index[adapter]
        if kind == "row":
            extra = F.linear(x, delta).to(result.dtype)  # only the k located rows' outputs
            return result.index_add_(-1, index, extra)
        extra = (x.index_select(-1, index[1]) * delta).to(result.dtype)
        return result.index_add_(-1, index[0], extra)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.mg_edit_delta:
                continue
            self._check_ready(adapter)
            result = self._add_adapter_output(result, x, adapter)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "mg_edit." + super().__repr__()

    def extra_repr(self) -> str:
        parts = [f"{a}: {k}" + (f"[{self.mg_edit_delta[a].shape[0]}]" if k != "dense" else "") for a, k in self.mg_edit_kind.items()]
        return f"conv1d={self.is_conv1d}, adapters=({', '.join(parts)})"
