"""promote: the registry's gate. The candidate (challenger) and the production model
(champion) are scored on the same test split in this run; the candidate is stored as a
version whatever the outcome (so it can be inspected, diffed or promoted by hand), and
becomes `production` only if it passes hemaflow.gate. Every decision goes to
promotion.json, the version's model card, the store's append-only ledger and (in the flow)
a Prefect markdown artifact.

Metrics are tied to the model's sha256: the gate's figures are computed here from the
model file whose hash is recorded, and evaluate's metrics.json is refused when its
`model_sha256` names another model.

Re-running is safe: a candidate whose model.keras (by sha256) is already production is a
no-op; one already stored (an earlier rejected run) is gated again without re-publishing.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hemaflow.config import PromoteParams
from hemaflow.errors import StageInputError, require_file
from hemaflow.gate import Check, Decision, decide, score, fingerprint_test_set
from hemaflow.model_card import MODEL_CARD_FILE, render_markdown
from hemaflow.model_folder import ModelFolder, open_model_folder
from hemaflow.progress import Progress
from hemaflow.provenance import code_revision, data_version, params_fingerprint
from hemaflow.store import (ModelStore, ModelVersion, StoreConflictError, StoreIntegrityError, hash_files,
                            open_store)

REQUIRED_METRICS = ("accuracy", "balanced_accuracy", "per_class")
PREPROCESSING = ("cells cut by the segment params below: on single-cell images the centred cell "
                 "(single_cell_crop: centre -> the centred fallback_crop_px window; detection -> the cell's "
                 "square box plus margin), on smear fields every cell's square box plus margin, background "
                 "masked white when mask_background; hemaflow classify cuts them the same way; decoded as RGB, "
                 "resized to the input size with antialiasing, values 0-255 (the model rescales)")


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool          # the candidate is (now or already) the store's production version
    published: bool         # this run wrote a new version
    model_name: str
    store_url: str
    sha256: str             # of model.keras
    version: int | None     # the candidate's version in the store
    uri: str | None
    reason: str
    min_balanced_accuracy: float
    metrics: dict[str, Any] = field(default_factory=dict)  # top-level scalars of metrics.json
    outcome: str = ""       # promoted | rejected | conflict | already production | forced
    production_version: int | None = None  # production after this run
    previous_production: int | None = None
    reasons: list[str] = field(default_factory=list)        # every check, PASS/FAIL with its numbers
    gate: dict[str, Any] | None = None
    data_version: dict[str, Any] | None = None
    code: dict[str, Any] | None = None
    ledger_id: str | None = None

    def record(self) -> dict[str, Any]:
        """The record written to promotion.json (every field)."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The short form: the CLI's lines, the flow's table artifact and log line."""
        return {"outcome": self.outcome, "version": self._tag(self.version), "published": self.published,
                "production": f"{self._tag(self.previous_production)} -> {self._tag(self.production_version)}",
                "reason": self.reason, "sha256": self.sha256, "store": self.store_url,
                "checks": "; ".join(self.reasons) or "-"}

    @property
    def markdown(self) -> str:
        """The decision for a Prefect markdown artifact."""
        lines = [f"## Promotion: {self.outcome or ('promoted' if self.promoted else 'not promoted')}", "",
                 f"**{self.reason}**", "",
                 f"- model `{self.model_name}` {f'v{self.version:04d}' if self.version else ''} "
                 f"sha256 `{self.sha256}`",
                 f"- production: {self._tag(self.previous_production)} -> {self._tag(self.production_version)}",
                 f"- store: {self.store_url}", ""]
        if self.gate:
            lines += ["| check | result | detail |", "|---|---|---|"]
            lines += [f"| {c['name']} | {'PASS' if c['passed'] else 'FAIL'} | {c['reason']} |"
                      for c in self.gate.get("checks", [])]
            lines.append("")
            ch, cp = self.gate.get("challenger") or {}, self.gate.get("champion") or {}
            if ch:
                lines += ["| class | challenger recall | champion recall | test images |", "|---|---:|---:|---:|"]
                for c, r in (ch.get("recall") or {}).items():
                    lines.append(f"| {c} | {_f(r)} | {_f((cp.get('recall') or {}).get(c))} | "
                                 f"{(ch.get('support') or {}).get(c)} |")
                lines.append("")
        return "\n".join(lines)

    @staticmethod
    def _tag(v: int | None) -> str:
        return f"v{v:04d}" if v else "none"


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def read_metrics(metrics_path: Path) -> dict[str, Any]:
    """metrics.json from evaluate; must carry the figures the gate and card need."""
    require_file(metrics_path, "evaluation metrics")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as exc:
        raise StageInputError(metrics_path, f"not valid JSON: {exc}") from exc
    if not isinstance(metrics, dict):
        raise StageInputError(metrics_path, f"expected a JSON object, got {type(metrics).__name__}")
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise StageInputError(metrics_path, f"missing key(s) {', '.join(missing)}; "
                                            f"found {', '.join(sorted(metrics)) or 'none'}")
    for key in ("accuracy", "balanced_accuracy"):
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or math.isnan(value) or not 0 <= value <= 1:
            raise StageInputError(metrics_path, f"{key} must be a number in [0, 1], got {value!r}")
    return metrics


def check_metrics_belong_to(metrics: dict[str, Any], metrics_path: Path, folder: ModelFolder) -> None:
    """Figures of one model can never promote another: metrics.json's model_sha256, when
    present, must be the sha256 of the model.keras being promoted."""
    tied = metrics.get("model_sha256")
    if tied is not None and tied != folder.sha256:
        raise StageInputError(metrics_path, f"model_sha256 {tied} is not the sha256 of {folder.model_path} "
                                            f"({folder.sha256}): these metrics belong to another model; re-run evaluate")


def summarize_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Top-level scalars (figures, split, n); per-class detail stays in metrics.json."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def write_promotion(promotion_path: Path, result: PromotionResult) -> None:
    """Atomic write, so a crash never leaves a half-written record for DVC to cache."""
    promotion_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=promotion_path.parent, prefix=f".{promotion_path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(result.record(), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, promotion_path)


def actor() -> str:
    """Who decided: HEMAFLOW_ACTOR, else user@host."""
    if os.environ.get("HEMAFLOW_ACTOR"):
        return os.environ["HEMAFLOW_ACTOR"]
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# --- the gate -------------------------------------------------------------------------------
def _scores(folder: ModelFolder, dataset_dir: Path, split: str, tta: bool = False):
    from hemaflow.tasks.evaluate import predict_split

    pred = predict_split(folder.path, dataset_dir, split, folder=folder, tta=tta)
    return pred, score(pred.y_true, pred.y_pred, pred.classes)


def gate(store: ModelStore, cfg: PromoteParams, folder: ModelFolder, dataset_dir: Path, split: str,
         champion: ModelVersion | None, tta: bool = False) -> tuple[Decision, dict[str, Any]]:
    """Score the challenger and (pulled, sha256-verified) champion on the same split; decide.
    Returns the decision and facts about the test set."""
    pred, challenger = _scores(folder, Path(dataset_dir), split, tta)
    test_set = {"dataset_dir": str(dataset_dir), "split": split, "tta": tta, "n": len(pred.paths),
                "sha256": fingerprint_test_set(pred.paths, pred.labels)}
    thresholds = dict(min_balanced_accuracy=cfg.min_balanced_accuracy, min_class_recall=cfg.min_class_recall,
                      min_improvement=cfg.min_improvement, mcnemar_alpha=cfg.mcnemar_alpha,
                      min_test_size=cfg.min_test_size)
    champ_scores = None
    if champion is not None:
        with tempfile.TemporaryDirectory(prefix="hemaflow-champion-") as tmp:
            store.pull(cfg.model_name, champion.version, Path(tmp))  # sha256 of every file checked
            champ_folder = open_model_folder(Path(tmp))              # and checked again against card.json
            if champ_folder.sha256 != champion.sha256:
                raise StoreIntegrityError(champion.uri, "pulled model.keras is not the production sha256")
            if champ_folder.classes != folder.classes:
                check = Check("same_classes", False,
                              f"champion {champion.tag} classes {list(champ_folder.classes)} differ from the "
                              f"challenger's {list(folder.classes)}: not comparable (promote by hand with --force)")
                return Decision(False, [check], challenger.as_dict(), thresholds=thresholds), test_set
            champ_pred, champ_scores = _scores(champ_folder, Path(dataset_dir), split, tta)
            if champ_pred.paths != pred.paths:
                raise StageInputError(Path(dataset_dir), "champion and challenger were not scored on the same images")
    return decide(challenger, champ_scores, **thresholds), test_set


def _summary_line(decision: Decision, champion: ModelVersion | None) -> str:
    vs = f"against production {champion.tag}" if champion else "first model (absolute thresholds)"
    if decision.passed:
        return f"passed the gate {vs}"
    return f"rejected {vs}: " + "; ".join(decision.failed)


def promote_model(model_dir: Path, eval_dir: Path, promotion_path: Path, cfg: PromoteParams, *,
                  dataset_dir: Path, split: str = "test", tta: bool = False, raw_dir: Path | None = None,
                  params: dict[str, Any] | None = None, source_commit: str | None = None,
                  progress: Progress | None = None) -> PromotionResult:
    """Gate the candidate in model_dir against production; store it; move production if it passes.

    dataset_dir: the augmented dataset (dataset.parquet) whose `split` both models are scored on.
    params: what to record in the card (the flow passes the full params); defaults to the
    promote block. raw_dir: its DVC md5 is the card's data version.
    """
    model_dir, eval_dir, promotion_path = Path(model_dir), Path(eval_dir), Path(promotion_path)
    folder = open_model_folder(model_dir)
    metrics_path = eval_dir / "metrics.json"
    metrics = read_metrics(metrics_path)
    check_metrics_belong_to(metrics, metrics_path, folder)
    sha = folder.sha256
    base = dict(model_name=cfg.model_name, store_url=cfg.store_url, sha256=sha,
                min_balanced_accuracy=cfg.min_balanced_accuracy, metrics=summarize_metrics(metrics))

    store = open_store(cfg.store_url)
    champion = store.production(cfg.model_name)
    if champion is not None and champion.sha256 == sha:
        result = PromotionResult(
            promoted=True, published=False, version=champion.version, uri=champion.uri, outcome="already production",
            production_version=champion.version, previous_production=champion.version,
            reason=f"same model.keras (sha256 {sha[:12]}) is already production {champion.tag}; nothing to do",
            **base)
        write_promotion(promotion_path, result)
        return result

    decision, test_set = gate(store, cfg, folder, dataset_dir, split, champion, tta)
    summary = _summary_line(decision, champion)
    data = data_version(raw_dir) if raw_dir is not None else {"path": None, "md5": None, "source": None}
    code = code_revision(model_dir.parent)
    if source_commit:
        code = {**code, "commit": source_commit}
    params = params if params is not None else {"promote": cfg.model_dump(mode="json")}
    existing = store.find_sha256(cfg.model_name, sha)
    if existing is not None:
        mv, published = existing, False
    else:
        files = {"model.keras": folder.model_path, "labels.json": folder.labels_path, "metrics.json": metrics_path}
        ext_path = eval_dir / "external" / "metrics.json"   # evaluate's external test folder, when given
        external = None
        if ext_path.is_file():
            try:
                external = json.loads(ext_path.read_text())
            except json.JSONDecodeError as exc:
                raise StageInputError(ext_path, f"not valid JSON: {exc}") from exc
            files["external_metrics.json"] = ext_path
        elif isinstance(metrics.get("external"), dict):
            external = metrics["external"]
        card = {
            "model_name": cfg.model_name,
            "classes": list(folder.classes),
            "input": {"image_size": folder.image_size, "channels": "RGB", "value_range": "0-255 float",
                      "preprocessing": PREPROCESSING, "segment": (params or {}).get("segment")},
            "params": params,
            "params_fingerprint": params_fingerprint(params),
            "data_version": data,
            "code": code,
            "source_commit": code.get("commit"),
            "metrics": summarize_metrics(metrics),
            "evaluation": {"internal": metrics, "external": external},
            "promotion": {"gate_passed": decision.passed, "summary": summary, "reasons": decision.reasons,
                          "gate": decision.as_dict(), "test_set": test_set,
                          "champion": {"version": champion.version, "sha256": champion.sha256} if champion else None,
                          "decided_by": actor()},
        }
        with tempfile.TemporaryDirectory(prefix="hemaflow-card-") as tmp:
            md_path = Path(tmp) / MODEL_CARD_FILE
            md_path.write_text(render_markdown({**card, "sha256": sha}, hash_files(files)))
            mv = store.publish(cfg.model_name, {**files, MODEL_CARD_FILE: md_path}, card, progress=progress)
        published = True

    previous = champion.version if champion else None
    production_version, outcome = previous, "rejected"
    reason = f"{mv.tag} {summary}; production stays {champion.tag if champion else 'unset'}"
    if decision.passed:
        try:
            store.set_production(cfg.model_name, mv.version, expected=previous, reason=summary)
            production_version, outcome = mv.version, "promoted"
            reason = f"{mv.tag} {summary}; production {champion.tag if champion else 'unset'} -> {mv.tag}"
        except StoreConflictError as exc:
            now = exc.current or {}
            production_version, outcome = now.get("version"), "conflict"
            reason = (f"{mv.tag} passed the gate against {champion.tag if champion else 'no production'}, but "
                      f"production moved to {now.get('tag', 'unset')} meanwhile (another promotion won); not "
                      "promoted: re-run promote to gate against the new production")
    entry = store.append_ledger(cfg.model_name, {
        "action": "promote", "actor": actor(), "outcome": outcome, "version": mv.version, "sha256": sha,
        "previous_production": previous, "production_changed": outcome == "promoted",
        "production_version": production_version, "reason": reason, "reasons": decision.reasons,
        "gate": decision.as_dict(), "test_set": test_set, "data_version": data, "code": code,
        "params_fingerprint": params_fingerprint(params)})
    result = PromotionResult(
        promoted=outcome == "promoted", published=published, version=mv.version, uri=mv.uri, reason=reason,
        outcome=outcome, production_version=production_version, previous_production=previous,
        reasons=decision.reasons, gate=decision.as_dict(), data_version=data, code=code, ledger_id=entry["id"],
        **base)
    write_promotion(promotion_path, result)
    return result


def promote_version(cfg: PromoteParams, version: str | int, dataset_dir: Path, split: str = "test", *,
                    tta: bool = False, force: bool = False, force_reason: str | None = None) -> dict[str, Any]:
    """`hemaflow models promote VERSION`: the same gate against production, by hand.
    force (with a reason) moves production even if the gate fails; both are in the ledger."""
    if force and not (force_reason or "").strip():
        raise StageInputError(Path(cfg.store_url), "--force needs --reason: say why the gate is overridden")
    store = open_store(cfg.store_url)
    mv = store.resolve(cfg.model_name, version)
    champion = store.production(cfg.model_name)
    if champion is not None and champion.version == mv.version:
        return {"outcome": "already production", "version": mv.version,
                "reason": f"{mv.tag} is already production; nothing to do"}
    with tempfile.TemporaryDirectory(prefix="hemaflow-challenger-") as tmp:
        store.pull(cfg.model_name, mv.version, Path(tmp))
        decision, test_set = gate(store, cfg, open_model_folder(Path(tmp)), dataset_dir, split, champion, tta)
    summary = _summary_line(decision, champion)
    previous = champion.version if champion else None
    outcome, production_version = "rejected", previous
    reason = f"{mv.tag} {summary}; production stays {champion.tag if champion else 'unset'}"
    if decision.passed or force:
        try:
            store.set_production(cfg.model_name, mv.version, expected=previous,
                                 reason=summary if decision.passed else f"forced: {force_reason}")
            outcome = "promoted" if decision.passed else "forced"
            production_version = mv.version
            reason = (f"{mv.tag} {summary}" if decision.passed else
                      f"{mv.tag} FORCED past the gate ({summary}) by {actor()}: {force_reason}") + \
                f"; production {champion.tag if champion else 'unset'} -> {mv.tag}"
        except StoreConflictError as exc:
            now = exc.current or {}
            outcome, production_version = "conflict", now.get("version")
            reason = f"production moved to {now.get('tag', 'unset')} meanwhile; {mv.tag} not promoted"
    entry = store.append_ledger(cfg.model_name, {
        "action": "manual-promote", "actor": actor(), "outcome": outcome, "version": mv.version,
        "sha256": mv.sha256, "previous_production": previous,
        "production_changed": outcome in ("promoted", "forced"), "production_version": production_version,
        "reason": reason, "reasons": decision.reasons, "gate": decision.as_dict(), "test_set": test_set,
        "forced": outcome == "forced", "force_reason": force_reason if force else None,
        "data_version": mv.card.get("data_version"), "code": mv.card.get("code")})
    return {"outcome": outcome, "version": mv.version, "production_version": production_version,
            "previous_production": previous, "reason": reason, "reasons": decision.reasons, "ledger_id": entry["id"]}


def rollback_production(cfg: PromoteParams, reason: str = "rollback") -> dict[str, Any]:
    """`hemaflow models rollback`: production back to the version it replaced (recorded in the ledger)."""
    store = open_store(cfg.store_url)
    current, _ = store.rollback_target(cfg.model_name)
    restored = store.rollback(cfg.model_name, reason=reason)
    text = f"production {current.tag} -> {restored.tag} (rollback: {reason})"
    entry = store.append_ledger(cfg.model_name, {
        "action": "rollback", "actor": actor(), "outcome": "rolled back", "version": restored.version,
        "sha256": restored.sha256, "previous_production": current.version, "production_changed": True,
        "production_version": restored.version, "reason": text,
        "data_version": restored.card.get("data_version"), "code": restored.card.get("code")})
    return {"outcome": "rolled back", "version": restored.version, "previous_production": current.version,
            "reason": text, "ledger_id": entry["id"]}
