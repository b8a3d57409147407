"""mg-editing: CodeGenBias, FB-Score and MG-Editing for gender bias in code LLMs."""

__version__ = "0.1.0"

from mg_editing import tuner as _tuner  # noqa: E402,F401  registers the MG_EDIT PEFT type
