"""``MGEditConfig``: the PEFT configuration of an MG-Editing adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig

from mg_editing.locations import GRANULARITIES, Locations, check_granularity

from .registration import MG_EDIT_PEFT_TYPE

__all__ = ["MGEditConfig", "compact_locations"]

#: how each granularity's located parameters are represented in a layer
_KIND = {"full": "dense", "layer": "dense", "module": "dense", "row": "row", "neuron": "neuron"}


def compact_locations(locations: Union[Locations, dict, None]) -> Optional[dict[str, Any]]:
    """The JSON form stored in ``adapter_config.json``: structure and per-module counts, no indices."""
    if locations is None:
        return None
    if isinstance(locations, Locations):
        return locations.to_dict(with_indices=False)
    out = {k: v for k, v in locations.items() if k not in ("rows", "neurons")}
    if "rows" in locations:
        out["num_rows"] = {k: len(v) for k, v in locations["rows"].items()}
    if "neurons" in locations:
        out["num_neurons"] = {k: len(v[0]) if len(v) else 0 for k, v in locations["neurons"].items()}
    return out


def _coarsen_compact(data: dict[str, Any], granularity: str) -> dict[str, Any]:
    out = dict(data, granularity=granularity)
    if granularity not in ("row", "neuron"):
        out["num_rows"] = {}
    if granularity != "neuron":
        out["num_neurons"] = {}
    if granularity == "full":
        out["modules"], out["layer"] = [], None
    return out


@dataclass
class MGEditConfig(PeftConfig):
    """Configuration of an MG-Editing adapter (:class:`~mg_editing.tuner.MGEditModel`).

    MG-Editing fine-tunes only the parameters that the locating phase
    (:func:`mg_editing.locate.locate`) found responsible for the bias. The adapter holds one
    zero-initialised delta per located module:

    * ``row``: a ``k x in`` delta for the ``k`` located output rows (+ the row indices);
    * ``neuron``: a vector of ``n`` deltas (+ their ``2 x n`` (row, column) indices);
    * ``module`` / ``layer`` / ``full``: a dense ``out x in`` delta of the module's weight
      (``layer``: every Linear/Conv1D of the key layer; ``full``: of every decoder block).

    At row / neuron granularity only the modules holding located rows / neurons are adapted
    (a located module without rows gets no delta).

    Biases are never edited (the paper edits weights only).

    Args:
        granularity: ``full``, ``layer``, ``module``, ``row`` or ``neuron``.
        locations: a :class:`~mg_editing.locations.Locations` (or its dict form). Finer
            locations are coarsened to ``granularity``; coarser ones are an error. ``None``
            runs the locating phase inside ``get_peft_model`` (needs a tokenizer, see
            ``tokenizer_name_or_path``). ``adapter_config.json`` stores only the compact form
            (``Locations.to_dict(with_indices=False)``: modules, key layer, per-module counts);
            the indices are buffers saved in ``adapter_model.safetensors``.
        target_modules: derived from the locations at injection time (the full names of the
            adapted modules); leave it unset.
        module_shapes: ``{module: [out, in]}`` of the adapted weights, filled at injection and
            checked when the adapter is loaded onto a base model.
        tokenizer_name_or_path: tokenizer for the locating phase (default: the model's own
            ``name_or_path``).
        locate_options: extra keyword arguments for :func:`mg_editing.locate.locate`.
        init_weights: ``True`` (default) starts from zero deltas (the adapter is the identity);
            ``False`` draws small random deltas (tests only).
        modules_to_save: other modules to train and save in full (PEFT's usual meaning).

    Example:
        >>> import torch
        >>> from mg_editing.locations import Locations
        >>> locs = Locations("row", modules=["transformer.h.1.mlp.fc_out"], layer=1,
        ...                  rows={"transformer.h.1.mlp.fc_out": torch.tensor([3, 7])})
        >>> MGEditConfig(granularity="row", locations=locs).compact_locations()["num_rows"]
        {'transformer.h.1.mlp.fc_out': 2}
    """

    granularity: str = field(
        default="row",
        metadata={"help": f"Editing granularity, one of {', '.join(GRANULARITIES)}."},
    )
    locations: Optional[Union[Locations, dict]] = field(
        default=None,
        metadata={
            "help": (
                "The located parameters (a mg_editing.locations.Locations or its dict form). None runs the "
                "locating phase in get_peft_model. Saved in compact form (counts only; indices go to the "
                "safetensors file)."
            )
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Full names of the adapted modules; derived from `locations` at injection, leave unset."},
    )
    module_shapes: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={"help": "{module: [out, in]} of the adapted weights; filled at injection, checked on load."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer for the locating phase when `locations` is None (default: the model's path)."},
    )
    locate_options: Optional[dict[str, Any]] = field(
        default=None,
        metadata={"help": "Keyword arguments for mg_editing.locate.locate when `locations` is None."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Zero-initialise the deltas (identity adapter). False gives random deltas, for tests."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules apart from the MG-Editing layers to train and save in full."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MG_EDIT_PEFT_TYPE
        try:
            check_granularity(self.granularity)
        except ValueError as err:
            raise ValueError(f"MGEditConfig: {err}") from None
        if self.locate_options is not None and not isinstance(self.locate_options, dict):
            raise TypeError(f"locate_options must be a dict of keyword arguments, got {type(self.locate_options).__name__}")
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
        self.locations = self._normalise_locations(self.locations)

    # -- locations -------------------------------------------------------------------------
    def _normalise_locations(self, locations: Union[Locations, dict, None]) -> Union[Locations, dict, None]:
        if locations is None:
            return None
        if isinstance(locations, dict):
            if "granularity" not in locations:
                raise ValueError("locations dict has no 'granularity'; pass Locations.to_dict() or a Locations")
            if "rows" in locations or "neurons" in locations or locations["granularity"] in ("full", "layer", "module"):
                locations = Locations.from_dict(locations)
            else:
                locations = dict(locations)
        elif not isinstance(locations, Locations):
            raise TypeError(f"locations must be a Locations or its dict form, got {type(locations).__name__}")
        have = locations.granularity if isinstance(locations, Locations) else locations["granularity"]
        check_granularity(have)
        want = self.granularity
        if GRANULARITIES.index(want) > GRANULARITIES.index(have):
            need = {"layer": "a key layer", "module": "located modules", "row": "located rows", "neuron": "located neurons"}
            raise ValueError(
                f"MGEditConfig(granularity={want!r}) needs {need[want]}, but the locations are at {have!r} "
                f"granularity. Locate again: mg_editing.locate.locate(model, tokenizer, dataset, granularity={want!r}), "
                f"or use granularity={have!r}."
            )
        if want != have:
            locations = locations.coarsen(want) if isinstance(locations, Locations) else _coarsen_compact(locations, want)
        self._check_locations_content(locations)
        return locations

    def _check_locations_content(self, locations: Union[Locations, dict]) -> None:
        data = compact_locations(locations)
        g = self.granularity
        modules = list(data.get("modules") or [])
        if g == "layer" and data.get("layer") is None:
            raise ValueError("layer granularity needs the key layer: Locations(layer=...) is None")
        if g == "module" and not modules:
            raise ValueError("module granularity needs located modules: Locations(modules=[...]) is empty")
        counts = {"row": data.get("num_rows") or {}, "neuron": data.get("num_neurons") or {}}.get(g)
        if counts is not None:
            if not counts:
                raise ValueError(f"{g} granularity needs located {g}s, and the locations hold none")
            for name, n in counts.items():
                if name not in modules:
                    raise ValueError(f"{g}s given for {name!r}, which is not among the located modules {modules}")
                if int(n) <= 0:
                    raise ValueError(f"{g} locations for {name!r} are empty; drop the module or locate again")

    @property
    def has_indices(self) -> bool:
        """Whether the row/neuron indices are in memory (False for a config read from JSON)."""
        return isinstance(self.locations, Locations) or self.granularity in ("full", "layer", "module")

    def compact_locations(self) -> Optional[dict[str, Any]]:
        return compact_locations(self.locations)

    def layer_plan(self, module_names: Optional[list[str]] = None) -> dict[str, tuple[str, int]]:
        """``{module: (kind, count)}``: what each adapted module holds.

        ``kind`` is ``row`` (count = located rows), ``neuron`` (count = located neurons) or
        ``dense`` (count = 0). ``full``/``layer`` granularities need ``module_names`` (resolved on
        the model: every weight module of the blocks / of the key layer).
        """
        if self.locations is None:
            raise ValueError("no locations yet; they are located in get_peft_model or passed as MGEditConfig(locations=...)")
        data = self.compact_locations()
        kind = _KIND[self.granularity]
        if kind == "row":
            return {m: ("row", int(n)) for m, n in data["num_rows"].items()}
        if kind == "neuron":
            return {m: ("neuron", int(n)) for m, n in data["num_neurons"].items()}
        if self.granularity == "module":
            return {m: ("dense", 0) for m in data["modules"]}
        if module_names is None:
            raise ValueError(f"{self.granularity} granularity: the adapted modules are resolved on the model")
        return {m: ("dense", 0) for m in module_names}

    def indices_for(self, module_name: str):
        """The in-memory index tensor for a module (row: ``k``, neuron: ``2 x n``), or ``None``."""
        if not isinstance(self.locations, Locations):
            return None
        if self.granularity == "row":
            return self.locations.rows.get(module_name)
        if self.granularity == "neuron":
            return self.locations.neurons.get(module_name)
        return None

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        locations = self.locations
        self.locations = None  # keep asdict from deep-copying index tensors
        try:
            out = super().to_dict()
        finally:
            self.locations = locations
        out["locations"] = compact_locations(locations)
        if isinstance(out.get("target_modules"), set):
            out["target_modules"] = sorted(out["target_modules"])
        return out
