"""`hemaflow models ...`: the model registry by hand (list, show, diff, promote, rollback, ledger).

The store is params `promote.store_url` (a directory, relative to the params file, or
s3://bucket/prefix with the standard AWS credential chain) unless --store-url is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hemaflow.config import ConfigError, Params, load_params


def _params(params_path: Path) -> Params:
    return load_params(params_path) if params_path.is_file() else Params()


def resolve_store_url(url: str, params_path: Path) -> str:
    """A relative directory store is relative to the params file's folder (as in the pipeline)."""
    if "://" in url or Path(url).is_absolute():
        return url
    return str(params_path.resolve().parent / url)


def _user_errors() -> tuple[type[BaseException], ...]:
    from hemaflow.errors import StageInputError
    from hemaflow.store import StoreError

    return StoreError, StageInputError, ConfigError


def _cleanly(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def _options(fn):
    fn = click.option("--model-name", default=None, help="Model name in the store; default params promote.model_name.")(fn)
    fn = click.option("--store-url", default=None, help="Store (directory or s3://bucket/prefix); default params.")(fn)
    fn = click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml",
                      show_default=True, help="Parameters file.")(fn)
    return fn


def _context(params_path: Path, store_url: str | None, model_name: str | None):
    from hemaflow.store import open_store

    p = _params(params_path)
    url = resolve_store_url(store_url or p.promote.store_url, params_path)
    cfg = p.promote.model_copy(update={"store_url": url, "model_name": model_name or p.promote.model_name})
    return p, cfg, open_store(url)


@click.group("models")
def models_group() -> None:
    """The model registry: versions, the production alias, the decision ledger."""


@models_group.command("list")
@_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
@_cleanly
def list_cmd(params_path: Path, store_url: str | None, model_name: str | None, as_json: bool) -> None:
    """Every complete version, oldest first; marks production and latest."""
    _, cfg, store = _context(params_path, store_url, model_name)
    prod, latest = store.production(cfg.model_name), store.latest(cfg.model_name)
    rows = []
    for mv in store.list_versions(cfg.model_name):
        card = mv.card
        m = card.get("metrics") or {}
        promo = card.get("promotion") or {}
        rows.append({"version": mv.tag, "created_at": card.get("created_at"), "sha256": mv.sha256[:12],
                     "balanced_accuracy": m.get("balanced_accuracy"), "n": m.get("n"),
                     "gate": None if "gate_passed" not in promo else ("pass" if promo["gate_passed"] else "fail"),
                     "data_md5": ((card.get("data_version") or {}).get("md5") or "")[:12] or None,
                     "commit": ((card.get("code") or {}).get("commit") or card.get("source_commit") or "")[:10] or None,
                     "aliases": [a for a, v in (("production", prod), ("latest", latest)) if v and v.version == mv.version]})
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    if not rows:
        click.echo(f"no versions of {cfg.model_name} in {cfg.store_url}")
        return
    click.echo(f"{'version':8} {'created (UTC)':20} {'sha256':12} {'bal.acc':>7} {'n':>5} {'gate':4} "
               f"{'data md5':12} {'commit':10} aliases")
    for r in rows:
        ba = "-" if r["balanced_accuracy"] is None else f"{r['balanced_accuracy']:.3f}"
        click.echo(f"{r['version']:8} {r['created_at'] or '-':20} {r['sha256']:12} {ba:>7} {str(r['n'] or '-'):>5} "
                   f"{r['gate'] or '-':4} {r['data_md5'] or '-':12} {r['commit'] or '-':10} {', '.join(r['aliases'])}")


@models_group.command("show")
@click.argument("version", default="production")
@_options
@click.option("--json", "as_json", is_flag=True, help="Print card.json instead of the markdown model card.")
@_cleanly
def show_cmd(version: str, params_path: Path, store_url: str | None, model_name: str | None, as_json: bool) -> None:
    """The model card of VERSION (production, latest, vN)."""
    from hemaflow.model_card import render_markdown

    _, cfg, store = _context(params_path, store_url, model_name)
    mv = store.resolve(cfg.model_name, version)
    click.echo(json.dumps(mv.card, indent=2, sort_keys=True) if as_json else render_markdown(mv.card))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def diff_cards(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[tuple[str, Any, Any]]]:
    """Metrics (all) and params (only those that differ) of two cards, side by side."""
    ma, mb = _flatten((a.get("evaluation") or {}).get("internal") or a.get("metrics") or {}), \
        _flatten((b.get("evaluation") or {}).get("internal") or b.get("metrics") or {})
    metrics = [(k, ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb))
               if not k.startswith("model_sha256") and (isinstance(ma.get(k), (int, float)) or
                                                        isinstance(mb.get(k), (int, float)))]
    pa, pb = _flatten(a.get("params") or {}), _flatten(b.get("params") or {})
    params = [(k, pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
    facts = [(k, _flatten(a).get(k), _flatten(b).get(k)) for k in
             ("sha256", "created_at", "data_version.md5", "code.commit", "code.dirty", "params_fingerprint")]
    return {"facts": facts, "metrics": metrics, "params": params}


@models_group.command("diff")
@click.argument("a")
@click.argument("b")
@_options
@_cleanly
def diff_cmd(a: str, b: str, params_path: Path, store_url: str | None, model_name: str | None) -> None:
    """Metrics and params of versions A and B side by side (params: only those that differ)."""
    _, cfg, store = _context(params_path, store_url, model_name)
    va, vb = store.resolve(cfg.model_name, a), store.resolve(cfg.model_name, b)
    d = diff_cards(va.card, vb.card)

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    width = max([len(k) for sect in d.values() for k, *_ in sect] + [10])
    for title, rows in (("", d["facts"]), ("metrics", d["metrics"]), ("params (differing)", d["params"])):
        click.echo(f"\n{title or 'version':{width}}  {va.tag:>14}  {vb.tag:>14}" + ("  delta" if title == "metrics" else ""))
        for k, x, y in rows:
            delta = f"  {y - x:+.4f}" if title == "metrics" and isinstance(x, (int, float)) and \
                isinstance(y, (int, float)) and not isinstance(x, bool) else ""
            click.echo(f"{k:{width}}  {fmt(x)[:40]:>14}  {fmt(y)[:40]:>14}{delta}")
        if not rows:
            click.echo("(none)")


@models_group.command("promote")
@click.argument("version")
@_options
@click.option("--augmented-dir", type=click.Path(path_type=Path), default=None,
              help="Dataset whose test split both models are scored on; default paths.augmented_dir.")
@click.option("--force", is_flag=True, help="Move production even if the gate fails (needs --reason).")
@click.option("--reason", default=None, help="Why the gate is overridden (recorded in the ledger).")
@_cleanly
def promote_cmd(version: str, params_path: Path, store_url: str | None, model_name: str | None,
                augmented_dir: Path | None, force: bool, reason: str | None) -> None:
    """Make VERSION production if it passes the gate against the current production."""
    from hemaflow.tasks.promote import promote_version

    p, cfg, _ = _context(params_path, store_url, model_name)
    dataset = augmented_dir or (params_path.resolve().parent / p.paths.augmented_dir)
    res = promote_version(cfg, version, dataset, p.evaluate.split, tta=p.evaluate.tta, force=force,
                          force_reason=reason)
    for r in res.get("reasons", []):
        click.echo(f"  {r}")
    click.echo(f"{res['outcome']}: {res['reason']}")
    if res["outcome"] in ("rejected", "conflict"):
        raise SystemExit(1)


@models_group.command("rollback")
@_options
@click.option("--reason", default="rollback by hand", show_default=True)
@_cleanly
def rollback_cmd(params_path: Path, store_url: str | None, model_name: str | None, reason: str) -> None:
    """Production back to the version it replaced."""
    from hemaflow.tasks.promote import rollback_production

    _, cfg, _ = _context(params_path, store_url, model_name)
    click.echo(rollback_production(cfg, reason=reason)["reason"])


@models_group.command("ledger")
@_options
@click.option("--json", "as_json", is_flag=True)
@_cleanly
def ledger_cmd(params_path: Path, store_url: str | None, model_name: str | None, as_json: bool) -> None:
    """Every decision, oldest first: who, what, when, why."""
    _, cfg, store = _context(params_path, store_url, model_name)
    for e in store.ledger(cfg.model_name):
        if as_json:
            click.echo(json.dumps(e, sort_keys=True))
        else:
            click.echo(f"{e.get('at')}  {e.get('action', ''):14} {e.get('outcome', ''):18} v{e.get('version') or 0:04d}  "
                       f"{e.get('actor', '')}  {e.get('reason', '')}")


def pull_model(store_url: str, model_name: str, spec: str, dest_dir: Path) -> tuple[Path, Any]:
    """Pull `spec` (production, latest, vN) into dest_dir, sha256-verified, and check it opens.

    Pulled into a temporary sibling first and swapped in, so dest_dir never mixes two
    versions; an existing dest_dir is replaced only if it is a pulled model folder."""
    import shutil
    import tempfile

    from hemaflow.model_folder import CARD_FILE, open_model_folder
    from hemaflow.store import StoreError, open_store

    store = open_store(store_url)
    mv = store.resolve(model_name, spec)
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and any(dest_dir.iterdir()) and not (dest_dir / CARD_FILE).is_file():
        raise StoreError(str(dest_dir), "destination exists and is not a pulled model folder; not overwriting it")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", dir=dest_dir.parent))
    try:
        store.pull(model_name, mv.version, tmp)
        open_model_folder(tmp)  # names and sha256 against card.json once more, on the final bytes
        if dest_dir.exists():
            shutil.rmtree(dest_dir)
        tmp.rename(dest_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest_dir, mv
