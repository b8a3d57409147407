"""MG-Editing as a PEFT adapter type (``MG_EDIT``): config, layer, tuner and registration.

Importing this package (``import mg_editing`` does) registers ``MG_EDIT`` with PEFT, so
``peft.get_peft_model(model, MGEditConfig(...))``, ``PeftModel.from_pretrained`` and
``merge_and_unload()`` work as for PEFT's own methods.
"""

from .config import MGEditConfig
from .layer import MGEditLayer, MGEditLinear
from .model import MGEditModel
from .registration import MG_EDIT_PEFT_TYPE, MG_EDIT_PREFIX, TESTED_PEFT_RANGE, register

__all__ = [
    "MG_EDIT_PEFT_TYPE",
    "MG_EDIT_PREFIX",
    "MGEditConfig",
    "MGEditLayer",
    "MGEditLinear",
    "MGEditModel",
    "TESTED_PEFT_RANGE",
    "register",
]

register(MGEditConfig, MGEditModel)
