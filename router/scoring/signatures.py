"""How the challenger's input signature differs from the champion's, said once at load time.

During a schema change clients send the union of both arms' columns; each arm takes its own
(``router/service.py``). Operators see the difference in ``/experiment`` and in the log line that
announces the models in service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow.types import DataType

from router.input.schema import is_named_columns
from router.logschema import Arm


@dataclass(frozen=True)
class SignatureDiff:
    """Columns the challenger adds, drops and types differently (named column signatures)."""

    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    retyped: tuple[tuple[str, str, str], ...] = ()  # (column, champion type, challenger type)
    comparable: bool = True  # False when either signature is not named columns (or absent)

    @property
    def same(self) -> bool:
        return self.comparable and not (self.added or self.dropped or self.retyped)

    def describe(self) -> str:
        if not self.comparable:
            return "input signatures not comparable (tensor, unnamed or missing)"
        if self.same:
            return "same input signature"
        parts = []
        if self.added:
            parts.append(f"adds {', '.join(self.added)}")
        if self.dropped:
            parts.append(f"drops {', '.join(self.dropped)}")
        if self.retyped:
            parts.append(
                "retypes " + ", ".join(f"{c} ({old} -> {new})" for c, old, new in self.retyped)
            )
        return "challenger " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "same": self.same,
            "comparable": self.comparable,
            "added": list(self.added),
            "dropped": list(self.dropped),
            "retyped": [
                {"column": c, Arm.CHAMPION.value: old, Arm.CHALLENGER.value: new}
                for c, old, new in self.retyped
            ],
            "summary": self.describe(),
        }


def type_name(t: Any) -> str:
    """A signature column type as MLflow spells it (``long``, ``double``, ``Array(string)``)."""
    return t.name if isinstance(t, DataType) else str(t)


def _columns(schema: Any) -> dict[str, str] | None:
    if not is_named_columns(schema):
        return None
    return {str(spec.name): type_name(spec.type) for spec in schema.inputs}


def signature_diff(champion: Any, challenger: Any) -> SignatureDiff:
    """The difference between two ``mlflow.types.Schema`` input signatures (or None)."""
    old, new = _columns(champion), _columns(challenger)
    if old is None or new is None:
        same = champion == challenger
        return SignatureDiff(comparable=same)
    return SignatureDiff(
        added=tuple(c for c in new if c not in old),
        dropped=tuple(c for c in old if c not in new),
        retyped=tuple((c, old[c], new[c]) for c in old if c in new and old[c] != new[c]),
    )
