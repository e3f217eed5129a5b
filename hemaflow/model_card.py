"""The model card: what card.json records about a version, rendered as markdown.

card.json (written by the store, last) is the machine-readable card; model_card.md, a
file of the version, is the same facts for a person: files and their sha256, classes,
input and preprocessing, data version, code revision, params, metrics, and the promotion
decision with every reason.
"""

from __future__ import annotations

import json
from typing import Any

MODEL_CARD_FILE = "model_card.md"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if v is None:
        return "-"
    return str(v)


def render_markdown(card: dict[str, Any], files: dict[str, dict[str, Any]] | None = None) -> str:
    files = files if files is not None else card.get("files") or {}
    title = card.get("model_name") or card.get("name") or "model"
    tag = card.get("tag")
    lines = [f"# Model card: {title}" + (f" {tag}" if tag else ""), ""]
    code, data = card.get("code") or {}, card.get("data_version") or {}
    lines += ["## Provenance", "",
              f"- model.keras sha256: `{card.get('sha256') or (files.get('model.keras') or {}).get('sha256')}`",
              f"- data version (DVC md5 of `{data.get('path')}`): `{data.get('md5')}` ({data.get('source')})",
              f"- code revision: `{code.get('commit')}`" + (" (dirty working tree)" if code.get("dirty") else ""),
              f"- params fingerprint: `{card.get('params_fingerprint')}`", ""]
    if files:
        lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---:|---|"]
        lines += [f"| {n} | {m.get('bytes')} | `{m.get('sha256')}` |" for n, m in sorted(files.items())]
        lines.append("")
    inp = card.get("input") or {}
    lines += ["## Classes and input", "", f"- classes (output order): {', '.join(card.get('classes') or [])}",
              f"- input: {inp.get('image_size')} x {inp.get('image_size')} x 3 {inp.get('channels', 'RGB')}, "
              f"{inp.get('value_range', '')}",
              f"- preprocessing: {inp.get('preprocessing', '')}", ""]
    ev = card.get("evaluation") or {}
    for name, m in ev.items():
        if not m:
            continue
        lines += [f"## Metrics ({name}: {m.get('split', '')} split, n={m.get('n')})", "",
                  f"accuracy {_fmt(m.get('accuracy'))}, balanced accuracy {_fmt(m.get('balanced_accuracy'))}, "
                  f"macro F1 {_fmt(m.get('macro_f1'))}", ""]
        per = m.get("per_class") or {}
        if per:
            lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {c} | {_fmt(v.get('precision'))} | {_fmt(v.get('recall'))} | {_fmt(v.get('f1'))} | "
                      f"{v.get('support')} |" for c, v in per.items()]
            lines.append("")
    promo = card.get("promotion") or {}
    if promo:
        lines += ["## Promotion decision", "", f"**{promo.get('summary', '')}**", ""]
        lines += [f"- {r}" for r in promo.get("reasons", [])]
        lines.append("")
    if card.get("params") is not None:
        lines += ["## Params of the run", "", "```json", json.dumps(card["params"], indent=2, sort_keys=True),
                  "```", ""]
    return "\n".join(lines)
