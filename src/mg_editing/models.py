"""Loading a causal LM and its tokenizer by Hub id, local path, or ``demo``.

Example:
    >>> from mg_editing.models import resolve_dtype
    >>> resolve_dtype("bf16")
    torch.bfloat16
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mg_editing.distributed import is_distributed, process_device

__all__ = ["DEMO_MODEL", "load_model_and_tokenizer", "resolve_dtype", "resolve_model_path"]

#: The model argument that names the project's own demo model.
DEMO_MODEL = "demo"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose from fp32, fp16, bf16") from None


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """``demo`` -> the cached demo model directory (built on first use); anything else as is."""
    if str(name_or_path) == DEMO_MODEL:
        from mg_editing.demo_model import demo_model_path

        return str(demo_model_path(build=True))
    return str(name_or_path)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    **model_kwargs,
):
    """Load ``(model, tokenizer)`` for any Hugging Face causal LM, in eval mode.

    ``name_or_path`` is a Hub id, a local directory, or ``"demo"``. Fails with one clear
    message when the checkpoint is not a causal LM.

    Placement: ``device`` puts the whole model on one device. ``device_map`` (``"auto"`` or a
    dict; with ``max_memory`` / ``offload_folder`` in ``model_kwargs``) lets accelerate shard
    a model too large for one device over several (GPUs, CPU, disk); locating, editing and
    scoring read every tensor on the device of the module that produced it. Under
    ``accelerate launch`` / ``torchrun`` without either, each process loads its own replica
    onto its own device (:func:`mg_editing.distributed.process_device`) for data-parallel runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = resolve_model_path(name_or_path)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved transformers model")
    config = AutoConfig.from_pretrained(path)
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    saved_as = list(getattr(config, "architectures", None) or [])
    # BERT-like encoders have a causal-LM class in transformers but were not trained as one:
    # trust the architecture the checkpoint was saved with.
    if causal_class is None or (saved_as and causal_class not in saved_as and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in saved_as)):
        raise ValueError(
            f"{name_or_path!r} is a {config.model_type!r} checkpoint saved as {saved_as or 'an unknown class'}, not a causal LM; "
            "mg-editing needs a causal (decoder) LM such as CodeGen, Llama, StableLM, Gemma or GPT-2"
        )
    kwargs = dict(model_kwargs)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        if device is not None:
            raise ValueError("pass either device (one device) or device_map (a model sharded over devices), not both")
        kwargs["device_map"] = device_map
    elif any(k in kwargs for k in ("max_memory", "offload_folder")):
        raise ValueError("max_memory and offload_folder only apply with a device_map (e.g. device_map='auto')")
    if device is None and device_map is None and is_distributed():
        device = process_device()  # data parallel: one replica per process, on its device
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None and device_map is None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
