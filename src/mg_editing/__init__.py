"""mg-editing: CodeGenBias, FB-Score and MG-Editing for gender bias in code LLMs."""

__version__ = "0.1.0"
