"""``to_dict`` / ``from_dict`` for the config dataclasses that artifacts record."""

from __future__ import annotations

import dataclasses


class DictConfig:
    """Mixin for a config dataclass: ``from_dict`` names unknown keys (a config written by another
    version, or a typo in a YAML) instead of failing with ``__init__``'s TypeError."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
