"""``Locations``: what the locating phase found, as a small serialisable object.

It is the hand-off between :mod:`mg_editing.locate` and the PEFT tuner
(``MGEditConfig(locations=...)``). The structure (granularity, module names, options) is
JSON; index and score tensors are safetensors.

Conventions:
    * module names are full dotted names from ``model.named_modules()``;
    * a *row* is an output unit of a module, i.e. row ``i`` of the ``out x in`` weight of an
      ``nn.Linear`` and column ``i`` of GPT-2's ``Conv1D`` weight (stored ``in x out``);
    * ``neurons[name]`` is a ``2 x n`` LongTensor of ``(row, column)`` pairs in the same
      ``out x in`` convention.

Example:
    >>> import torch
    >>> from mg_editing.locations import Locations
    >>> locs = Locations("row", modules=["transformer.h.1.mlp.fc_out"], layer=1,
    ...                  rows={"transformer.h.1.mlp.fc_out": torch.tensor([3, 7])})
    >>> locs.num_rows
    2
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GRANULARITIES: tuple[str, ...] = ("full", "layer", "module", "row", "neuron")

_JSON_NAME = "locations.json"
_TENSORS_NAME = "locations.safetensors"


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    return granularity


@dataclass
class Locations:
    """Parameters located as responsible for the bias, at one granularity.

    Attributes:
        granularity: one of ``full``, ``layer``, ``module``, ``row``, ``neuron``.
        modules: the located weight-holding modules (ranked, most important first). Empty
            for ``full``, which means every linear weight of the decoder blocks.
        layer: index of the key layer (``None`` for ``full``).
        rows: module name -> sorted 1-D LongTensor of located output rows.
        neurons: module name -> ``2 x n`` LongTensor of located ``(row, column)`` pairs.
        scores: named importance tensors kept for plots and reports (for example
            ``layer_importance``, ``layer_argmax_counts``, ``module_importance``).
        meta: options and provenance (base model, top-k, aggregation, split, prompt count).
    """

    granularity: str
    modules: list[str] = field(default_factory=list)
    layer: int | None = None
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    neurons: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_granularity(self.granularity)
        self.modules = list(self.modules)
        self.rows = {k: torch.as_tensor(v, dtype=torch.long).reshape(-1) for k, v in self.rows.items()}
        self.neurons = {k: torch.as_tensor(v, dtype=torch.long).reshape(2, -1) for k, v in self.neurons.items()}
        self.scores = {k: torch.as_tensor(v) for k, v in self.scores.items()}
        if self.granularity in ("row", "neuron") and not self.rows:
            raise ValueError(f"{self.granularity} locations need located rows")
        if self.granularity == "neuron" and not self.neurons:
            raise ValueError("neuron locations need located neurons")
        for name in list(self.rows) + list(self.neurons):
            if name not in self.modules:
                raise ValueError(f"indices given for {name!r}, which is not among the located modules {self.modules}")

    @property
    def num_rows(self) -> int:
        return sum(int(v.numel()) for v in self.rows.values())

    @property
    def num_neurons(self) -> int:
        return sum(int(v.shape[1]) for v in self.neurons.values())

    def coarsen(self, granularity: str) -> "Locations":
        """The same locations seen at a coarser granularity (e.g. ``row`` -> ``module``)."""
        check_granularity(granularity)
        if GRANULARITIES.index(granularity) > GRANULARITIES.index(self.granularity):
            raise ValueError(f"cannot refine {self.granularity} locations to {granularity}; locate again")
        return Locations(
            granularity,
            modules=[] if granularity == "full" else list(self.modules),
            layer=None if granularity == "full" else self.layer,
            rows=self.rows if granularity in ("row", "neuron") else {},
            neurons=self.neurons if granularity == "neuron" else {},
            scores=dict(self.scores),
            meta=dict(self.meta),
        )

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self, with_indices: bool = True) -> dict[str, Any]:
        """JSON-able form. Without indices it keeps only the per-module counts."""
        out: dict[str, Any] = {
            "granularity": self.granularity,
            "modules": list(self.modules),
            "layer": self.layer,
            "num_rows": {k: int(v.numel()) for k, v in self.rows.items()},
            "num_neurons": {k: int(v.shape[1]) for k, v in self.neurons.items()},
            "meta": self.meta,
        }
        if with_indices:
            out["rows"] = {k: v.tolist() for k, v in self.rows.items()}
            out["neurons"] = {k: v.tolist() for k, v in self.neurons.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Locations":
        if isinstance(data, Locations):
            return data
        if "rows" not in data and data.get("granularity") in ("row", "neuron"):
            raise ValueError("this locations dict holds counts only; load the indices with Locations.load(dir)")
        return cls(
            data["granularity"],
            modules=data.get("modules", []),
            layer=data.get("layer"),
            rows=data.get("rows", {}),
            neurons=data.get("neurons", {}),
            meta=data.get("meta", {}),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``locations.json`` and ``locations.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"rows::{k}": v.contiguous() for k, v in self.rows.items()}
        tensors.update({f"neurons::{k}": v.contiguous() for k, v in self.neurons.items()})
        tensors.update({f"scores::{k}": v.detach().float().contiguous() for k, v in self.scores.items()})
        save_file(tensors, str(directory / _TENSORS_NAME))
        (directory / _JSON_NAME).write_text(json.dumps(self.to_dict(with_indices=False), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Locations":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / _JSON_NAME).is_file():
            raise FileNotFoundError(f"no {_JSON_NAME} in {directory}; write one with Locations.save() or `mg-edit locate`")
        data = json.loads((directory / _JSON_NAME).read_text())
        tensors = load_file(str(directory / _TENSORS_NAME)) if (directory / _TENSORS_NAME).is_file() else {}
        parts: dict[str, dict[str, torch.Tensor]] = {"rows": {}, "neurons": {}, "scores": {}}
        for key, value in tensors.items():
            kind, name = key.split("::", 1)
            parts[kind][name] = value
        return cls(
            data["granularity"],
            modules=data.get("modules", []),
            layer=data.get("layer"),
            rows=parts["rows"],
            neurons=parts["neurons"],
            scores=parts["scores"],
            meta=data.get("meta", {}),
        )

    def summary(self) -> dict[str, Any]:
        """What was located, for model cards and logs (modules, layer, row/neuron counts)."""
        out: dict[str, Any] = {"modules": self.modules or "every linear weight of the decoder blocks", "layer": self.layer}
        if self.rows:
            out["rows"] = self.num_rows
        if self.neurons:
            out["neurons"] = self.num_neurons
        return out

    def __repr__(self) -> str:
        parts = [f"granularity={self.granularity!r}"]
        if self.layer is not None:
            parts.append(f"layer={self.layer}")
        if self.modules:
            parts.append(f"modules={self.modules}")
        if self.rows:
            parts.append(f"rows={self.num_rows}")
        if self.neurons:
            parts.append(f"neurons={self.num_neurons}")
        return f"Locations({', '.join(parts)})"
