"""``MGEditModel``: the PEFT tuner that injects :class:`~mg_editing.tuner.layer.MGEditLinear` layers."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from mg_editing.architecture import get_architecture, is_weight_module, weight_out_in

from .config import MGEditConfig
from .layer import MGEditLayer, MGEditLinear, quantization_problem, validate_indices
from .registration import MG_EDIT_PREFIX

__all__ = ["MGEditModel"]

_HOW_TO_PASS_LOCATIONS = (
    "Pass the locations yourself: MGEditConfig(granularity=..., locations=mg_editing.locate.locate(model, tokenizer, "
    "mg_editing.data.load_codegenbias('train+dev'), granularity=...)), or name a tokenizer: "
    "MGEditConfig(tokenizer_name_or_path=...)."
)


def _strip_base_layer(name: str) -> str:
    while name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def _resolve_tokenizer(model: nn.Module, config: MGEditConfig):
    path = config.tokenizer_name_or_path or getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not path:
        raise ValueError(
            "MGEditConfig has no locations, so get_peft_model has to run the locating phase, which needs a tokenizer; "
            "none is set (tokenizer_name_or_path) and the model has no name_or_path to load one from. "
            + _HOW_TO_PASS_LOCATIONS
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"MGEditConfig has no locations and the tokenizer for the locating phase could not be loaded from "
            f"{path!r}: {err}. " + _HOW_TO_PASS_LOCATIONS
        ) from err


def run_locating(model: nn.Module, config: MGEditConfig):
    """The locating phase of ``get_peft_model`` for a config without locations."""
    tokenizer = _resolve_tokenizer(model, config)
    # `from mg_editing import locate` would give the package-level function; the module's is the same.
    from mg_editing.data import load_codegenbias
    from mg_editing.locate import locate

    dataset = load_codegenbias("train+dev")
    return locate(model, tokenizer, dataset, granularity=config.granularity, **(config.locate_options or {}))


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take adapter ``adapter_name`` off every MG-Editing layer (unwrapping layers left without adapters)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, MGEditLayer) or adapter_name not in module.mg_edit_kind:
            continue
        if adapter_name in module.merged_adapters:
            module.unmerge()
        if set(module.mg_edit_kind) == {adapter_name}:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
        else:
            module.delete_adapter(adapter_name)
    from peft import PeftModel

    if isinstance(model, PeftModel):
        holder, configs = model.base_model.model, model.base_model.peft_config
    else:  # layers injected straight into a model (peft.inject_adapter_in_model)
        holder, configs = model, getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
        if not configs and "peft_config" in holder.__dict__:
            del holder.__dict__["peft_config"]


class MGEditModel(BaseTuner):
    """Injects MG-Editing deltas into the located modules of a causal LM.

    Built by ``peft.get_peft_model(model, MGEditConfig(...))`` once :mod:`mg_editing` is imported
    (which registers the ``MG_EDIT`` PEFT type). Every check (modules present, weight shapes, index
    ranges, quantized weights) runs before the model is touched.

    Example:
        >>> import sys, torch, peft; sys.path.insert(0, "tests")
        >>> from conftest import make_model
        >>> from mg_editing.locations import Locations
        >>> from mg_editing.tuner import MGEditConfig
        >>> name = "transformer.h.1.mlp.fc_out"
        >>> locs = Locations("row", modules=[name], layer=1, rows={name: torch.tensor([0, 5])})
        >>> model = peft.get_peft_model(make_model("codegen"), MGEditConfig(granularity="row", locations=locs))
        >>> model.get_nb_trainable_parameters()[0]  # 2 rows x 128 inputs of fc_out
        256
    """

    prefix: str = MG_EDIT_PREFIX
    tuner_layer_cls = MGEditLayer
    target_module_mapping: dict[str, list[str]] = {}

    # -- planning (all checks before the model is touched) ---------------------------------
    def _plan(self, model: nn.Module, config: MGEditConfig) -> tuple[dict[str, tuple[str, int]], dict[str, torch.Tensor]]:
        if not isinstance(config, MGEditConfig):
            raise TypeError(f"MGEditModel needs an MGEditConfig, got {type(config).__name__}")
        if config.locations is None:
            config.locations = config._normalise_locations(run_locating(model, config))
        names = None
        if config.granularity in ("full", "layer"):
            arch = get_architecture(model)
            layer = None if config.granularity == "full" else config.compact_locations()["layer"]
            if layer is not None and not -arch.num_layers <= int(layer) < arch.num_layers:
                raise ValueError(
                    f"the adapter's key layer {layer} does not exist: the model has {arch.num_layers} layers "
                    "(an adapter for another base model?)"
                )
            names = list(dict.fromkeys(_strip_base_layer(n) for n in arch.weight_modules(layer)))
        plan = config.layer_plan(names)

        problems: list[str] = []
        shapes: dict[str, list[int]] = {}
        for name in plan:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                problems.append(f"module {name!r} does not exist in {type(model).__name__}")
                continue
            base = module.get_base_layer() if isinstance(module, MGEditLayer) else module
            if not is_weight_module(base):
                problems.append(f"{name!r} is a {type(base).__name__}, not an nn.Linear / Conv1D")
                continue
            quant = quantization_problem(base)
            if quant is not None:
                problems.append(f"{name!r}: {quant}")
                continue
            shapes[name] = list(weight_out_in(base).shape)
        quantized = [p for p in problems if "quantiz" in p or "dtype" in p]
        if quantized:
            raise ValueError(
                "MG-Editing cannot edit a quantized (int8 / 4-bit) base model: its deltas must be merged into the "
                "weights, which is impossible there. Load the base model in float32 / float16 / bfloat16. "
                f"Problems: {'; '.join(quantized)}"
            )
        if config.module_shapes is not None:
            expected = {k: list(v) for k, v in config.module_shapes.items()}
            for name in expected.keys() - plan.keys():
                problems.append(f"the adapter was made for module {name!r}, which this config/model does not resolve")
            for name, shape in shapes.items():
                if name in expected and expected[name] != shape:
                    problems.append(f"{name!r} has an out x in weight of {shape}, the adapter was made for {expected[name]}")
                elif name not in expected:
                    problems.append(f"{name!r} is not among the adapter's modules {sorted(expected)}")
        elif config.target_modules is not None and not isinstance(config.target_modules, str):
            if set(config.target_modules) != set(plan):
                problems.append(
                    f"target_modules {sorted(config.target_modules)} disagree with the modules the locations cover "
                    f"{sorted(plan)}; leave target_modules unset (it is derived from the locations)"
                )
        if problems:
            base_name = config.base_model_name_or_path or "another base model"
            raise ValueError(
                f"this MG-Editing adapter does not fit {type(model).__name__} (was it made for {base_name}?): "
                + "; ".join(problems)
            )

        indices: dict[str, torch.Tensor] = {}
        for name, (kind, count) in plan.items():
            idx = config.indices_for(name)
            if idx is None:
                continue
            problem = validate_indices(kind, idx, count, tuple(shapes[name]))
            if problem:
                problems.append(f"{name}: {problem}")
            indices[name] = idx
        if problems:
            raise ValueError("invalid MG-Editing locations: " + "; ".join(problems))

        config.module_shapes = shapes
        config.target_modules = list(plan)
        return plan, indices

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        plans = self.__dict__.setdefault("_mg_edit_plans", {})
        plans[adapter_name] = self._plan(model, self.peft_config[adapter_name])
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except BaseException:
            _remove_adapter(model, adapter_name)  # leave nothing half-injected
            raise
        finally:
            plans.pop(adapter_name, None)

    @staticmethod
    def _check_target_module_exists(peft_config: MGEditConfig, key: str) -> bool:
        # exact full names only: suffix matching could hit a same-named module in another layer
        return key in (peft_config.module_shapes or {})

    def _create_and_replace(
        self,
        mg_edit_config: MGEditConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        plan, indices = self._mg_edit_plans[adapter_name]
        kind, count = plan[current_key]
        kwargs = dict(
            kind=kind,
            count=count,
            indices=indices.get(current_key),
            init_weights=mg_edit_config.init_weights,
            inference_mode=mg_edit_config.inference_mode,
        )
        if isinstance(target, MGEditLayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            new_module = MGEditLinear(target, adapter_name, **kwargs)
            if adapter_name not in self.active_adapters:
                # an additional adapter is not trainable until set_adapter
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's default also moves the new module's tensors to the old weight's device, which is
        # ``meta`` for a weight accelerate offloaded (the indices would be lost). Ours were made
        # where the layer computes (``compute_device``) by ``update_layer``; quantized layers,
        # the other case the default handles, are refused.
        setattr(parent, child_name, new_module)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: MGEditConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Remap as PEFT does, then check every delta and index tensor before anything is loaded.

        The layers were built from the compact config with placeholder indices; here the file's
        indices are range-checked against the base weights and installed. On any problem the
        adapter is taken off the model again and a ``ValueError`` explains what is wrong.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problems: list[str] = []
        to_install: list[tuple[MGEditLayer, torch.Tensor]] = []
        known: set[str] = set()
        for name, module in model.named_modules():
            if not isinstance(module, MGEditLayer) or adapter_name not in module.mg_edit_kind:
                continue
            kind = module.mg_edit_kind[adapter_name]
            delta_key = f"{name}.mg_edit_delta.{adapter_name}"
            index_key = f"{name}.mg_edit_index.{adapter_name}"
            known.update((delta_key, index_key))
            shown = _strip_base_layer(name).removeprefix("base_model.model.")
            delta = remapped.get(delta_key)
            expected = tuple(module.mg_edit_delta[adapter_name].shape)
            if delta is None:
                problems.append(f"{shown}: the file has no delta")
            elif tuple(delta.shape) != expected:
                problems.append(f"{shown}: delta of shape {tuple(delta.shape)}, expected {expected}")
            if kind == "dense":
                continue
            index = remapped.get(index_key)
            count = module.mg_edit_delta[adapter_name].shape[0]
            if index is None:
                problems.append(f"{shown}: the file has no {kind} indices")
                continue
            problem = validate_indices(kind, index, count, module.weight_shape)
            if problem:
                problems.append(f"{shown}: {problem}")
            else:
                to_install.append((module, index))
                remapped[index_key] = index.long()
        stray = [k for k in remapped if (".mg_edit_delta" in k or ".mg_edit_index" in k) and k not in known]
        if stray:
            problems.append(f"the file holds MG-Editing tensors for modules the config does not name: {stray[:5]}")
        if problems:
            _remove_adapter(model, adapter_name)
            raise ValueError(
                f"cannot load MG-Editing adapter {adapter_name!r} (corrupt file, or an adapter for another base "
                "model): " + "; ".join(problems)
            )
        for module, index in to_install:
            module.mg_edit_index[adapter_name] = index.long().to(module.get_base_layer().weight.device)
            module._mg_edit_pending.discard(adapter_name)
        return remapped
