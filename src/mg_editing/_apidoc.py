"""Generate ``docs/api.md``, the API reference, from the public docstrings and signatures.

    python -m mg_editing._apidoc > docs/api.md

The reference lists, for every public module of the package (no leading underscore; ``cli``
is documented by ``mg-edit COMMAND --help`` instead), the names in its ``__all__`` (or, for a
module without ``__all__``, the public names it defines itself), each with its signature and
its own docstring (inherited docstrings are not shown). Constants show their value when it is
short and does not depend on the machine, and the ``#:`` comment above their assignment.

Only :mod:`inspect`, :mod:`ast` and :mod:`importlib` are used; the output depends on the
source alone (no memory addresses, no absolute paths), so ``tests/test_docs.py`` can check
that the committed file is up to date.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

PACKAGE = "mg_editing"
REGENERATE = "python -m mg_editing._apidoc > docs/api.md"

#: Modules in reading order (the pipeline's order); any other public module is appended
#: alphabetically, so a new module shows up without editing this list.
ORDER = (
    "data", "scoring", "architecture", "locations", "locate", "tuner", "edit", "locality",
    "sandbox", "report", "hub", "plots", "pipeline", "models", "demo_model", "metrics",
    "distributed",
)
#: Not part of the Python API reference.
EXCLUDED = ("cli",)

_MAX_VALUE = 100
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def public_modules() -> list[str]:
    """Full names of the documented modules, in reading order."""
    package = importlib.import_module(PACKAGE)
    found = sorted(
        info.name for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_") and info.name not in EXCLUDED
    )
    ordered = [m for m in ORDER if m in found] + [m for m in found if m not in ORDER]
    return [f"{PACKAGE}.{m}" for m in ordered]


def _own_doc(obj: Any) -> str:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else ""


def _source_tree(module: ModuleType) -> ast.Module | None:
    try:
        return ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return None


def _assignment_comment(module: ModuleType, name: str, depth: int = 0) -> str:
    """The ``#:`` comment block above ``name = ...`` in the module's source, following
    ``from .x import name`` into sibling modules."""
    tree = _source_tree(module)
    if tree is None or depth > 3:
        return ""
    lines = inspect.getsource(module).splitlines()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            comment = []
            i = node.lineno - 2
            while i >= 0 and lines[i].lstrip().startswith("#:"):
                comment.insert(0, lines[i].lstrip()[2:].strip())
                i -= 1
            return " ".join(comment)
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__ or module.__name__)
            try:
                return _assignment_comment(importlib.import_module(source), name, depth + 1)
            except ImportError:
                return ""
    return ""


def _defined_names(module: ModuleType) -> list[str]:
    """Public names a module without ``__all__`` defines itself (not those it imports)."""
    tree = _source_tree(module)
    names: list[str] = []
    for node in tree.body if tree else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def _exported(module: ModuleType) -> tuple[list[str], bool]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names), True
    return _defined_names(module), False


class _Source(str):
    """An annotation kept as source text (``from __future__ import annotations``), shown unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _unquoted(annotation: Any) -> Any:
    return _Source(annotation) if isinstance(annotation, str) else annotation


def _short_default(value: Any) -> Any:
    """A default value as shown: a dataclass instance equal to its class's defaults as
    ``Name()``, anything else by its repr."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            if value == type(value)():
                return _Source(f"{type(value).__name__}()")
        except TypeError:
            pass
    return value


def _signature(obj: Any, name: str) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    sig = sig.replace(
        parameters=[p.replace(annotation=_unquoted(p.annotation), default=_short_default(p.default))
                    for p in sig.parameters.values()],
        return_annotation=_unquoted(sig.return_annotation),
    )
    return _ADDRESS.sub("", f"{name}{sig}")


def _value_text(value: Any) -> str | None:
    text = _ADDRESS.sub("", repr(value))
    home = str(Path.home())
    machine_dependent = home in text or str(Path(__file__).resolve().parent) in text
    if len(text) > _MAX_VALUE or machine_dependent or "\n" in text:
        return None
    return text


def _fence(lang: str, text: str) -> list[str]:
    # longer than any run of backticks inside, so a docstring cannot close it
    ticks = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    return [f"{ticks}{lang}", text, ticks, ""]


def _doc_block(doc: str) -> list[str]:
    # Docstrings are Google-style plain text (indentation matters, ``>>>`` examples), which
    # Markdown would reflow; shown verbatim instead.
    return _fence("text", doc) if doc else ["*(no docstring)*", ""]


def _class_signature(cls: type, name: str) -> tuple[str, str]:
    """The class's signature (a dataclass: its fields) and a note on fields it inherits
    from dataclasses outside the package."""
    bases = [b for b in cls.__bases__ if b is not object]
    base_text = f"({', '.join(b.__name__ for b in bases)})" if bases else ""
    if dataclasses.is_dataclass(cls):
        lines = ["@dataclass", f"class {name}{base_text}:"]
        for f in dataclasses.fields(cls):
            if not _declared_in_package(cls, f.name):
                continue
            annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))
            if f.default is not dataclasses.MISSING:
                lines.append(f"    {f.name}: {annotation} = {_ADDRESS.sub('', repr(f.default))}")
            elif f.default_factory is not dataclasses.MISSING:
                lines.append(f"    {f.name}: {annotation} = {f.default_factory.__name__}()")
            else:
                lines.append(f"    {f.name}: {annotation}")
        foreign = sorted({f"{b.__module__.split('.')[0]}.{b.__qualname__}" for b in cls.__mro__[1:]
                          if dataclasses.is_dataclass(b) and not b.__module__.startswith(PACKAGE)})
        note = f"Also takes the fields it inherits from {', '.join(f'`{b}`' for b in foreign)}." if foreign else ""
        return "\n".join(lines), note
    inherited_init = any(not b.__module__.startswith(PACKAGE) and b.__init__ is cls.__init__ for b in cls.__mro__[1:])
    sig = None if inherited_init else _signature(cls, name)
    if sig is None:
        return f"class {name}{base_text}", ""
    return f"class {sig}" + (f"  # bases: {', '.join(b.__name__ for b in bases)}" if bases else ""), ""


def _declared_in_package(cls: type, field_name: str) -> bool:
    for klass in cls.__mro__:
        if field_name in klass.__dict__.get("__annotations__", {}):
            return klass.__module__.startswith(PACKAGE)
    return False


def _members(cls: type) -> Iterable[tuple[str, Any]]:
    for key, value in cls.__dict__.items():
        if key.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            yield key, value.__func__
        elif isinstance(value, property) or inspect.isfunction(value):
            yield key, value


def _document_class(cls: type, name: str, module_name: str) -> list[str]:
    signature, note = _class_signature(cls, name)
    out = [f"### class `{name}`", ""]
    if cls.__module__ != module_name:
        out += [f"Defined in `{cls.__module__}`.", ""]
    out += _fence("python", signature)
    if note:
        out += [note, ""]
    doc = _own_doc(cls)
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        doc = ""  # the dataclass decorator's generated docstring repeats the signature
    out += _doc_block(doc)
    for key, member in _members(cls):
        if isinstance(member, property):
            out += [f"#### property `{name}.{key}`", ""]
            out += _doc_block(_own_doc(member))
            continue
        out += [f"#### `{name}.{key}`", ""]
        out += _fence("python", _signature(member, key) or key)
        out += _doc_block(_own_doc(member))
    return out


def _document_function(func: Any, name: str, module_name: str) -> list[str]:
    out = [f"### `{name}`", ""]
    if getattr(func, "__module__", module_name) != module_name:
        out += [f"Defined in `{func.__module__}`.", ""]
    out += _fence("python", _signature(func, name) or f"{name}(...)")
    return out + _doc_block(_own_doc(func))


def _document_constant(module: ModuleType, value: Any, name: str) -> list[str]:
    out = [f"### `{name}`", ""]
    text = _value_text(value)
    out += _fence("python", f"{name}: {type(value).__name__}" + (f" = {text}" if text is not None else ""))
    comment = _assignment_comment(module, name)
    if comment:
        out += [comment, ""]
    return out


def document_module(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names, has_all = _exported(module)
    out = [f"## `{module_name}`", ""]
    out += _doc_block(_own_doc(module))
    if not has_all:
        out += ["*No `__all__`: the public names this module defines.*", ""]
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            out += _document_class(obj, name, module_name)
        elif callable(obj) and (inspect.isfunction(obj) or inspect.isbuiltin(obj) or hasattr(obj, "__wrapped__")):
            out += _document_function(obj, name, module_name)
        else:
            out += _document_constant(module, obj, name)
    return out


def _top_level() -> list[str]:
    package = importlib.import_module(PACKAGE)
    out = [f"## `{PACKAGE}`", ""]
    out += _doc_block(_own_doc(package))
    out += ["| name | defined in |", "|---|---|"]
    for name in package.__all__:
        obj = getattr(package, name)
        where = getattr(obj, "__module__", PACKAGE) if callable(obj) else PACKAGE
        out.append(f"| `{name}` | `{where}` |")
    return out + [""]


def generate() -> str:
    modules = public_modules()
    out = [
        "# API reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the docstrings; do not edit by hand. "
        "tests/test_docs.py checks that this file is up to date. -->",
        "",
        "Generated from the public docstrings and signatures: for each module the names in its",
        "`__all__`. The command line is documented by `mg-edit --help` and `mg-edit COMMAND --help`.",
        "Docstrings are shown verbatim (Google style, with `>>>` examples).",
        "",
        "Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in [PACKAGE, *modules]),
        "",
    ]
    out += _top_level()
    for module_name in modules:
        out += document_module(module_name)
    text = "\n".join(out).rstrip("\n") + "\n"
    return text


def main() -> int:
    sys.stdout.flush()
    sys.stdout.buffer.write(generate().encode("utf-8"))  # UTF-8 whatever the locale
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
