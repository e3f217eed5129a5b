"""Class taxonomy: map the spellings people write to canonical class names."""

from __future__ import annotations

import re
from dataclasses import dataclass


def fold(text: str) -> str:
    """Case-fold and squeeze punctuation/space: ' Neutrophils ' -> 'neutrophils'."""
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[str, ...]
    lookup: dict[str, str]

    @classmethod
    def build(cls, classes: tuple[str, ...], synonyms: dict[str, tuple[str, ...]]) -> "Taxonomy":
        unknown = [c for c in synonyms if c not in classes]
        if unknown:
            raise ValueError(f"synonyms name classes not in base.classes: {', '.join(unknown)}")
        lookup: dict[str, str] = {}
        for c in classes:
            for s in (c, *synonyms.get(c, ())):
                lookup[fold(s)] = c
        return cls(tuple(classes), lookup)

    def canonical(self, text: str) -> str | None:
        """Canonical class for one label, folding case and a plural 's'; None if unknown."""
        key = fold(text)
        if key in self.lookup:
            return self.lookup[key]
        if key.endswith("s") and key[:-1] in self.lookup:
            return self.lookup[key[:-1]]
        return None


def split_labels(text: str) -> list[str]:
    """A multi-label cell 'NEUTROPHIL, LYMPHOCYTE' or 'a;b' -> its parts (blank parts dropped)."""
    return [p for p in (x.strip() for x in re.split(r"[,;|]", text)) if p]
