"""What the report says about the run besides the statistics: the model, the data and the pass settings.

Typed records instead of a nested dict read by key. :meth:`RunContext.to_dict` is the JSON the feature
store keeps (``context`` attribute) and holds the report's ``model``/``data`` blocks key for key;
:meth:`RunContext.from_dict` reads it back for re-analysis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class ModelContext:
    """The audited checkpoint (SPEC §5 ``model``)."""

    path: str
    sha256: str
    format: str
    architecture: str
    num_parameters: int
    assumptions: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), assumptions=list(self.assumptions))


@dataclass(frozen=True)
class DataContext:
    """The audited data file (SPEC §5 ``data``)."""

    path: str
    sha256: str
    x_key: str
    y_key: str
    num_samples: int
    input_shape: tuple[int, ...]
    target_dim: int

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), input_shape=list(self.input_shape))


@dataclass(frozen=True)
class RunContext:
    """Model, data and the pass's own settings; ``world_size`` only for a sharded (torchrun) run."""

    model: ModelContext
    data: DataContext
    device: str = "cpu"
    batch_size: int = 0
    world_size: int | None = field(default=None)
    uint8_unscaled: bool = False  # X was uint8 and fed unscaled: a report warning, kept by the store only

    def with_assumptions(self, notes: tuple[str, ...]) -> "RunContext":
        """This context with ``notes`` appended to the model's assumptions (each once, in order)."""
        kept = list(self.model.assumptions)
        kept += [n for n in dict.fromkeys(notes) if n and n not in kept]
        return replace(self, model=replace(self.model, assumptions=tuple(kept)))

    def to_dict(self) -> dict[str, Any]:
        """The store's ``context`` attribute; the report's ``model``/``data`` blocks are its first two entries."""
        out: dict[str, Any] = {"model": self.model.to_dict(), "data": self.data.to_dict(), "device": self.device,
                               "batch_size": self.batch_size}  # fmt: skip
        if self.world_size is not None:
            out["world_size"] = self.world_size
        if self.uint8_unscaled:  # so that re-analysis repeats the report's uint8 warning
            out["uint8_unscaled"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunContext":
        """The context a feature store recorded (``to_dict``'s layout)."""
        m, x = dict(d["model"]), dict(d["data"])
        model = ModelContext(**dict(m, assumptions=tuple(m.get("assumptions", ()))))
        data = DataContext(**dict(x, input_shape=tuple(x["input_shape"])))
        return cls(model, data, d.get("device", "cpu"), d.get("batch_size", 0), d.get("world_size"),
                   bool(d.get("uint8_unscaled", False)))
