"""Registering the out-of-tree PEFT type ``MG_EDIT`` with the installed ``peft``.

``peft.utils.register_peft_method`` only accepts names that are already members of PEFT's
``PeftType`` enum, and that enum cannot be extended from outside. PEFT types are looked up
by value in plain dicts (``peft.mapping.PEFT_TYPE_TO_*_MAPPING``) and ``PeftConfig.peft_type``
is typed ``Union[str, PeftType]``; ``PeftType`` is a ``str`` enum, so a plain string key
hashes and compares like an enum member would. We therefore register the string
``"MG_EDIT"`` directly in those mappings, making the same collision checks that
``register_peft_method`` makes. Registration is idempotent for our own classes and fails
loudly if another method already holds the name or the prefix.

Everything that touches PEFT internals lives in this one module; :data:`TESTED_PEFT_RANGE`
records the PEFT versions it was tested against.
"""

from __future__ import annotations

import warnings

__all__ = [
    "MG_EDIT_PEFT_TYPE",
    "MG_EDIT_PREFIX",
    "MGEditPeftType",
    "TESTED_PEFT_RANGE",
    "check_peft_version",
    "is_registered",
    "register",
]

#: PEFT versions this registration (and the tuner's use of BaseTuner hooks) was tested with.
TESTED_PEFT_RANGE = ">=0.21.2,<0.22"
#: Below this, the state-dict hooks the tuner relies on do not exist: refuse to register.
MIN_PEFT_VERSION = "0.21.0"


class MGEditPeftType(str):
    """The plain-string PEFT type ``"MG_EDIT"``, with the ``.name`` / ``.value`` of an enum member.

    It equals and hashes like ``"MG_EDIT"`` (so mapping look-ups with the string read from an
    ``adapter_config.json`` work) and serialises to JSON as that string. ``.value``, ``.name``
    and ``str()`` mimic ``PeftType`` members, because some PEFT code paths format them
    (``get_model_status``, error messages of mixed models and hot-swapping).
    """

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{str.__str__(self)}"

    def __repr__(self) -> str:
        return repr(str.__str__(self))

    def __reduce__(self):
        return (MGEditPeftType, (str.__str__(self),))


MG_EDIT_PEFT_TYPE = MGEditPeftType("MG_EDIT")
MG_EDIT_PREFIX = "mg_edit_"


def check_peft_version() -> str:
    """Check the installed PEFT against :data:`TESTED_PEFT_RANGE`; return its version.

    Raises ``ImportError`` below :data:`MIN_PEFT_VERSION` (the BaseTuner state-dict hooks the tuner
    needs are missing there), warns outside the tested range.
    """
    import peft
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = Version(peft.__version__)
    from peft.tuners.tuners_utils import BaseTuner

    hooks = ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load", "_remove_adapter_name_from_key")
    if version < Version(MIN_PEFT_VERSION) or not all(hasattr(BaseTuner, h) for h in hooks):
        raise ImportError(
            f"mg_editing's PEFT adapter type needs peft{TESTED_PEFT_RANGE} (found {peft.__version__}, which lacks "
            f"BaseTuner.{'/'.join(hooks)}). Install a tested version: pip install 'peft{TESTED_PEFT_RANGE}'"
        )
    if version not in SpecifierSet(TESTED_PEFT_RANGE):
        warnings.warn(
            f"mg_editing's MG_EDIT PEFT type was tested with peft{TESTED_PEFT_RANGE}; found {peft.__version__}. "
            "It registers itself in peft.mapping's PEFT_TYPE_TO_* dicts, which are PEFT internals: check that "
            "saving and loading adapters still round-trip (tests/test_tuner.py).",
            RuntimeWarning,
            stacklevel=2,
        )
    return peft.__version__


def _same_class(a: type, b: type) -> bool:
    # A module reload (importlib.reload, notebook autoreload) creates new class objects: still ours.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def is_registered() -> bool:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return MG_EDIT_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING


def register(config_cls: type | None = None, model_cls: type | None = None, prefix: str = MG_EDIT_PREFIX) -> None:
    """Register ``MG_EDIT`` -> (``MGEditConfig``, ``MGEditModel``, ``prefix``) in ``peft.mapping``.

    Idempotent for our own classes. Raises ``KeyError`` if another method holds the type name or
    the prefix, ``ValueError`` if the tuner class's ``prefix`` disagrees, mirroring
    ``peft.utils.register_peft_method``.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    if config_cls is None or model_cls is None:
        from .config import MGEditConfig
        from .model import MGEditModel

        config_cls = config_cls or MGEditConfig
        model_cls = model_cls or MGEditModel

    check_peft_version()
    key = MG_EDIT_PEFT_TYPE
    if prefix.endswith("__") or not prefix.endswith("_") or not prefix.islower():
        raise ValueError(f"the prefix must be lower case and end with a single '_', got {prefix!r}")
    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix is not None and model_prefix != prefix:
        raise ValueError(f"Inconsistent prefixes found: {prefix!r} and {model_prefix!r} (they should be the same).")

    for mapping, ours, what in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, config_cls, "config"),
        (PEFT_TYPE_TO_TUNER_MAPPING, model_cls, "tuner"),
    ):
        held = mapping.get(key)
        if held is not None and not _same_class(held, ours):
            raise KeyError(
                f"There is already a PEFT method called {key.value!r} ({what} class {held.__module__}.{held.__qualname__}); "
                "mg_editing cannot register its MG_EDIT adapter type."
            )
    if key in PEFT_TYPE_TO_MIXED_MODEL_MAPPING:
        raise KeyError(f"There is already a (mixed-model) PEFT method called {key.value!r}.")
    held_prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(key)
    if held_prefix is not None and held_prefix != prefix:
        raise KeyError(f"PEFT type {key.value!r} is registered with prefix {held_prefix!r}, not {prefix!r}.")
    # register_peft_method tests `prefix in PEFT_TYPE_TO_PREFIX_MAPPING` (the keys); the prefixes are the values.
    clash = [str(t) for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != key]
    if clash:
        raise KeyError(f"There is already a prefix called {prefix!r} (used by {clash}), please choose a unique prefix.")

    # Replace a string key left by an older registration with our typed key (same hash and equality).
    for mapping, value in (
        (PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
        (PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
    ):
        mapping.pop(key, None)
        mapping[key] = value


def unregister() -> None:
    """Remove ``MG_EDIT`` from ``peft.mapping`` (for tests)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        mapping.pop(MG_EDIT_PEFT_TYPE, None)
