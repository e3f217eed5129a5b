"""Class taxonomy: map the spellings people write to canonical class names.

Labels arrive as typed by hand ("NEUTROPHIL", "Neutrophils", "seg") or as a folder name
("ig"), and PBC-style file names carry a subtype prefix ("SNE_123.jpg", "MMY_45.jpg").
Everything is folded (case, spaces/underscores/hyphens, a plural s) and looked up in one
table built from params: canonical class -> accepted synonyms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def fold(text: str) -> str:
    """Case-fold and squeeze punctuation/space: ' Band_Neutrophils ' -> 'band neutrophils'."""
    return re.sub(r"[\s_\-]+", " ", text.strip().lower()).strip()


def _singular(key: str) -> str | None:
    """'neutrophils' -> 'neutrophil', 'immature granulocytes' -> 'immature granulocyte'."""
    return key[:-1] if len(key) > 2 and key.endswith("s") else None


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[str, ...]
    lookup: dict[str, str]   # folded spelling -> canonical class

    @classmethod
    def build(cls, classes: tuple[str, ...] | list[str], synonyms: dict[str, tuple[str, ...]]) -> "Taxonomy":
        """Lookup table; a synonym for an unknown class or one spelling under two classes is an error."""
        classes = tuple(classes)
        unknown = [c for c in synonyms if c not in classes]
        if unknown:
            raise ValueError(f"synonyms name classes not in base.classes: {', '.join(unknown)}")
        lookup: dict[str, str] = {}
        clashes: list[str] = []
        for c in classes:
            for s in (c, *synonyms.get(c, ())):
                key = fold(s)
                if lookup.get(key, c) != c:
                    clashes.append(f"'{s}' -> {lookup[key]} and {c}")
                lookup[key] = c
        if clashes:
            raise ValueError(f"ambiguous synonyms (one spelling under two classes): {'; '.join(clashes)}")
        return cls(classes, lookup)

    def canonical(self, text: str) -> str | None:
        """Canonical class for one label, folding case and a plural 's'; None if unknown."""
        key = fold(text)
        if key in self.lookup:
            return self.lookup[key]
        single = _singular(key)
        return self.lookup.get(single) if single else None

    def subtype_class(self, file_name: str) -> str | None:
        """Class named by a PBC-style subtype prefix ('SNE_123.jpg' -> neutrophil); None if no known prefix."""
        stem = file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        prefix, sep, _ = stem.partition("_")
        return self.canonical(prefix) if sep and prefix else None


def split_labels(text: str) -> list[str]:
    """A multi-label cell 'NEUTROPHIL, LYMPHOCYTE' or 'a;b' -> its parts (blank parts dropped)."""
    return [p for p in (x.strip() for x in re.split(r"[,;|/+]", text)) if p]
