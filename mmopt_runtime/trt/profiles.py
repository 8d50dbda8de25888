"""An engine's optimization profiles, and which one a call's shapes take. Pure.

Deriving profiles from a bundle's captured shapes is the build side's (``mmopt.trt.profiles``); running an
engine only needs to pick, per call, the narrowest profile the shapes fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Profile:
    """One optimization profile: for each input, its min / opt / max shape."""

    name: str
    shapes: dict[str, dict[str, tuple[int, ...]]]

    def contains(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        for name, shape in shapes.items():
            lo, hi = self.shapes[name]["min"], self.shapes[name]["max"]
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                return False
        return True

    def slack(self) -> int:
        """How wide the profile is; the runner prefers the narrowest profile that fits a call."""
        return sum(b - a for s in self.shapes.values() for a, b in zip(s["min"], s["max"]))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name,
                "shapes": {n: {k: list(v) for k, v in s.items()} for n, s in self.shapes.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Profile":
        return cls(d["name"], {n: {k: tuple(v) for k, v in s.items()} for n, s in d["shapes"].items()})


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Index of the narrowest profile that contains ``shapes``; None when none does."""
    fits = [(p.slack(), i) for i, p in enumerate(profiles) if p.contains(shapes)]
    return min(fits)[1] if fits else None
