"""mg-editing: CodeGenBias, FB-Score and MG-Editing for gender bias in code LLMs.

Importing the package registers the ``MG_EDIT`` adapter type with PEFT, so
``get_peft_model(model, MGEditConfig(...))`` and ``PeftModel.from_pretrained(base, path)``
work. The main entry points are importable from here::

    from mg_editing import load_codegenbias, pronoun_probabilities, fb_score, locate, MGEditConfig, edit
"""

__version__ = "0.1.0"

from mg_editing import tuner as _tuner  # noqa: E402,F401  registers the MG_EDIT PEFT type
from mg_editing.tuner import MGEditConfig  # noqa: E402

# `locate` and `edit` are both a module and its main function: bind the functions eagerly, or
# the first `import mg_editing.locate` anywhere would leave the module under that name.
from mg_editing.edit import edit  # noqa: E402
from mg_editing.locate import locate  # noqa: E402

_LAZY = {
    "load_codegenbias": "mg_editing.data",
    "pronoun_probabilities": "mg_editing.scoring",
    "fb_score": "mg_editing.scoring",
    "score_dataset": "mg_editing.scoring",
    "Locations": "mg_editing.locations",
    "EditConfig": "mg_editing.edit",
    "load_model_and_tokenizer": "mg_editing.models",
    "run_pipeline": "mg_editing.pipeline",
    "RunSettings": "mg_editing.pipeline",
}

__all__ = ["MGEditConfig", "__version__", "edit", "locate", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mg_editing' has no attribute {name!r}")
