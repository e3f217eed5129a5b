"""Prefect UI artifacts: stage summary tables, progress bars, the stages' pictures and the
promotion decision.

Pictures are markdown artifacts with the images embedded as data: URIs (downscaled): the
Prefect UI (classic and /v2) renders them on the artifact's page, nothing else has to be
reachable from the browser, and they stay viewable after the run's files are gone.
tests/flows/test_work_pool_ui.py checks that they render in Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact

from hemaflow.progress import Progress


def artifact_key(stage: str, what: str) -> str:
    return f"{stage}-{what}".replace("_", "-").lower()


def publish_summary(stage: str, summary: dict, markdown: str | None = None) -> None:
    """One table (metric, value) per stage run, plus the stage's own markdown report if it has one."""
    create_table_artifact(table=[{"metric": k, "value": str(v)} for k, v in summary.items()],
                          key=artifact_key(stage, "summary"), description=f"{stage}: summary of this run")
    if markdown:
        create_markdown_artifact(markdown=markdown, key=artifact_key(stage, "report"), description=f"{stage} report")


def stage_progress(stage: str, step_pct: float = 10.0) -> Progress:
    """The flow's progress callback: the Prefect progress artifact, and a log line every 10%.

    The log lines are the terminal's progress display for `hemaflow run` (Prefect owns the
    console there; the stage commands draw a tqdm bar instead).
    """
    from prefect import get_run_logger

    artifact = progress_artifact(stage)
    logger = get_run_logger()
    state = {"next": 0.0}

    def update(done: int, total: int) -> None:
        artifact(done, total)
        pct = 100.0 * done / total if total else 100.0
        if done and (pct >= state["next"] or done >= total):
            logger.info("%s progress: %d/%d (%.0f%%)", stage, done, total, pct)
            state["next"] = (pct // step_pct + 1) * step_pct

    return update


def progress_artifact(stage: str, min_interval_s: float = 1.0) -> Progress:
    """A Progress callback that drives a Prefect progress artifact, throttled to one update a second."""
    state: dict = {"id": None, "last": 0.0}

    def update(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if state["id"] is None:
            state["id"] = create_progress_artifact(progress=pct, key=artifact_key(stage, "progress"),
                                                   description=f"{stage}: {done}/{total}")
            state["last"] = now
        elif done >= total or now - state["last"] >= min_interval_s:
            update_progress_artifact(state["id"], progress=pct, description=f"{stage}: {done}/{total}")
            state["last"] = now

    return update


# Stage -> the output folders whose top-level PNGs are the stage's pictures (contact sheets,
# training curves, confusion matrix, reliability diagram, error gallery, ...)
PICTURE_DIRS = {"segment": ("crops_dir",), "augment": ("augmented_dir",), "train": ("model_dir",),
                "evaluate": ("eval_dir",)}
FIRST = ("confusion_matrix", "training_curves", "fields_contact_sheet", "contact_sheet")
MAX_SIDE_PX = 1200


def stage_pictures(stage: str, paths) -> list[Path]:
    """The stage's pictures: every PNG at the top of its output folders, best known first."""
    found = [f for attr in PICTURE_DIRS.get(stage, ()) for f in sorted(Path(getattr(paths, attr)).glob("*.png"))]
    return sorted(found, key=lambda f: (FIRST.index(f.stem) if f.stem in FIRST else len(FIRST), f.name))


def picture_title(path: Path) -> str:
    return path.stem.replace("_", " ").capitalize()


def image_data_uri(path: Path, max_side: int = MAX_SIDE_PX) -> str:
    """The picture as a data: URI, at most max_side px wide, in the smaller of PNG and JPEG."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, "white")
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        else:
            im = im.convert("RGB")
        if im.width > max_side:
            im = im.resize((max_side, max(1, round(im.height * max_side / im.width))), Image.Resampling.LANCZOS)
        encoded = []
        for fmt, mime, kw in (("PNG", "image/png", {"optimize": True}), ("JPEG", "image/jpeg", {"quality": 88})):
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            encoded.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, data = min(encoded)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def pictures_markdown(stage: str, pictures: list[Path]) -> str:
    parts = [f"# {stage}: pictures\n"]
    for f in pictures:
        title = picture_title(f)
        parts.append(f"## {title}\n\n![{title}]({image_data_uri(f)})\n\n`{f}`\n")
    return "\n".join(parts)


def publish_pictures(stage: str, paths) -> str | None:
    """One markdown artifact `<stage>-pictures` with the stage's pictures; None if it has none."""
    pictures = stage_pictures(stage, paths)
    if not pictures:
        return None
    key = artifact_key(stage, "pictures")
    create_markdown_artifact(markdown=pictures_markdown(stage, pictures), key=key,
                             description=f"{stage}: " + ", ".join(picture_title(f).lower() for f in pictures))
    return key


def browser_link(uri: str, expires_s: int = 7 * 24 * 3600) -> str | None:
    """A URL a browser can open for a stored file: presigned for s3:// (the longest SigV4
    allows), as is for http(s); None for a local path (not reachable from the UI)."""
    if uri.startswith(("http://", "https://")):
        return uri
    if not uri.startswith("s3://"):
        return None
    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    return boto3.client("s3").generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                     ExpiresIn=expires_s)


def _stored_file(version_uri: str, names: tuple[str, ...]) -> str | None:
    """The first of names that exists in the model version folder (local or s3://)."""
    for name in names:
        uri = f"{version_uri.rstrip('/')}/{name}"
        if uri.startswith("s3://"):
            import boto3

            bucket, _, key = uri[len("s3://"):].partition("/")
            try:
                boto3.client("s3").head_object(Bucket=bucket, Key=key)
                return uri
            except Exception:
                continue
        elif Path(uri).is_file():
            return uri
    return None


def promotion_markdown(record: dict, promotion_path: Path) -> tuple[str, dict[str, str]]:
    """The decision as markdown, and the browser links it names (model card, model version)."""
    version = record.get("version")
    verdict = "promoted" if record.get("promoted") else "not promoted"
    lines = [f"# Promotion decision: {verdict}" + (f", candidate v{version:04d}" if isinstance(version, int) else ""), "",
             str(record.get("reason", "")), ""]
    metrics = record.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()] + [""]
    links: dict[str, str] = {}
    uri = record.get("uri")
    if uri:
        card = _stored_file(uri, ("model_card.md", "card.json"))
        card_url = browser_link(card) if card else None
        if card_url:
            links["model card"] = card_url
        lines.append(f"- Model card: [{Path(card).name}]({card_url})" if card_url
                     else f"- Model card: `{card}`" if card else f"- Model version: `{uri}`")
    lines.append(f"- Promotion record: `{promotion_path}`")
    lines += ["", "```json", json.dumps(record, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines), links


def publish_promotion(promotion_path: Path) -> None:
    """`promotion-decision` markdown (decision, metrics, links) and a `model-card` link artifact."""
    from prefect.artifacts import create_link_artifact

    promotion_path = Path(promotion_path)
    if not promotion_path.is_file():
        return
    record = json.loads(promotion_path.read_text())
    markdown, links = promotion_markdown(record, promotion_path)
    create_markdown_artifact(markdown=markdown, key="promotion-decision",
                             description="promote: the decision, its metrics and the model card")
    if "model card" in links:
        create_link_artifact(link=links["model card"], link_text="model card", key="model-card",
                             description=f"model card of {record.get('model_name')} v{record.get('version')}")
