"""`hemaflow` command line: the whole pipeline (`run`), each stage, data generation, model pull.

dvc.yaml calls the stage commands, so `dvc repro`, the CLI and the Prefect flow run the same
code through hemaflow.tasks.stages.run_stage. Every path is an option whose default comes from
params.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

# Offline by default: Prefect's temporary server must not try to send telemetry (it fails
# here and can lock its database); TensorFlow's C++ notices are noise for a CLI user.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click

from hemaflow.config import ConfigError, Params, load_params, require_no_extends
from hemaflow.errors import SourceReadError, StageInputError
from hemaflow.flows.models_cli import _cleanly as _store_errors_cleanly
from hemaflow.flows.models_cli import models_group, pull_model, resolve_store_url
from hemaflow.tasks.stages import STAGES


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a failed gate: print the message, not a traceback."""
    errs: list[type[BaseException]] = [StageInputError, ConfigError, SourceReadError]
    for mod, name in (("hemaflow.tasks.validate_labels", "LabelValidationError"), ("hemaflow.tasks.check_quality", "QualityGateError")):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, name):
            errs.append(getattr(m, name))
    return tuple(errs)


class _NoUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; for bad input or a failed gate
    the message (which names the file) is the whole story, so its traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], _user_errors()):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors_in_logs() -> None:
    flt = _NoUserErrorTracebacks()
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                       if n.startswith("prefect")]
    for handler in {h for lg in loggers for h in getattr(lg, "handlers", [])}:
        handler.addFilter(flt)


def _fail_cleanly(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                raise click.ClickException(str(exc)) from exc
            raise
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hemaflow")
def app() -> None:
    """hemaflow: train and ship white-blood-cell classifiers reproducibly (Prefect + DVC)."""


params_option = click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml",
                             show_default=True, help="Parameters file (paths are relative to its folder).")


@app.command()
@params_option
@click.option("--force", is_flag=True, help="Run every stage even if DVC says it is up to date.")
def run(params_path: Path, force: bool) -> None:
    """Run the whole pipeline as a Prefect flow (local mode, no server needed).

    With the project's params.yaml, stages DVC reports up to date are skipped and the
    stages that run are recorded in dvc.lock. Another params file runs every stage.
    """
    from hemaflow.flows.training import training_pipeline

    _quiet_user_errors_in_logs()
    try:
        summary = training_pipeline(params_path=str(params_path.resolve()), force=force)
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            raise click.ClickException(str(exc)) from exc
        raise
    click.echo(format_run_summary(summary))


def format_run_summary(summary: dict) -> str:
    ev, pr = summary.get("evaluation", {}), summary.get("promotion", {})
    lines = ["", "hemaflow run finished", f"  stages run:     {', '.join(summary.get('ran', [])) or 'none'}",
             f"  up to date:     {', '.join(summary.get('skipped', [])) or 'none'}"]
    if ev:
        lines += [f"  accuracy:          {ev.get('accuracy', float('nan')):.3f}",
                  f"  balanced accuracy: {ev.get('balanced_accuracy', float('nan')):.3f}",
                  f"  macro F1:          {ev.get('macro_f1', float('nan')):.3f}"]
    if pr:
        state = "promoted" if pr.get("promoted") else "not promoted"
        lines += [f"  model:          {pr.get('model_name')} v{pr.get('version')} ({state}: {pr.get('reason', '')})",
                  f"  model store:    {pr.get('uri')}"]
    for k, v in summary.get("reports", {}).items():
        lines.append(f"  {k + ':':<15} {v}")
    return "\n".join(lines)


@app.command()
@params_option
def serve(params_path: Path) -> None:
    """Serve scheduled retraining on a Prefect server (PREFECT_API_URL): cron + data-change trigger.

    Runs until interrupted; the deployments show in the Prefect UI.
    """
    from prefect import serve as prefect_serve

    from hemaflow.flows.schedules import retraining_deployments

    try:
        deployments = retraining_deployments(params_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    prefect_serve(*deployments)


def _is_store_spec(value: str) -> bool:
    import re

    return bool(re.fullmatch(r"(?i)production|latest|v?\d+", value.strip())) and not Path(value).is_dir()


@app.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model", default="production", show_default=True,
              help="production, latest or vN from the model store (pulled and sha256-verified into "
                   "models/pulled/<name>-<version>), or a model folder (models/candidate).")
@click.option("--store-url", default=None, help="Model store (directory or s3://bucket/prefix); default from params.")
@click.option("--model-name", default=None)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default="reports/classify", show_default=True)
@click.option("--overlays", is_flag=True, help="Also write overlays/<image>.png with every cell's box and label.")
@click.option("--layout", type=click.Choice(["auto", "smear", "single-cell"]), default="auto", show_default=True,
              help="smear: every white cell of each image; single-cell: the one centred cell of each image "
                   "(PBC-style), cut as training cut it; auto: the layout the model was trained on.")
@click.option("--tta/--no-tta", default=None,
              help="Average the 8 flips/rotations of each cell. Default: as the model was evaluated "
                   "(its params' evaluate.tta).")
@params_option
@_fail_cleanly
@_store_errors_cleanly
def classify(images: tuple[Path, ...], model: str, store_url: str | None, model_name: str | None, out_dir: Path,
             overlays: bool, layout: str, tta: bool | None, params_path: Path) -> None:
    """Find and classify every white cell in smear or single-cell images (files or folders): per cell
    top-3 classes, per image and overall differential count (CSV + JSON), images/second."""
    from hemaflow.progress import tqdm_progress
    from hemaflow.tasks.classify import classify_smears

    fallback = load_params(params_path) if params_path.is_file() else Params()
    if _is_store_spec(model):
        url = resolve_store_url(store_url or fallback.promote.store_url, params_path)
        name = model_name or fallback.promote.model_name
        model_dir, mv = pull_model(url, name, model, Path("models/pulled") / f"{name}-{model.strip().lower()}")
        click.echo(f"model: {name} {mv.tag} ({model}) from {url}, sha256 {mv.sha256[:12]} verified")
    else:
        model_dir = Path(model)
    result = classify_smears(model_dir, list(images), out_dir, fallback, progress=tqdm_progress("classify"),
                             overlays=overlays, layout=layout.replace("-", "_"), tta=tta)
    for k, v in result.summary().items():
        click.echo(f"{k}: {v}")


@app.command()
@params_option
@click.option("--write-back", is_flag=True, help="Write the best grid point into the params file's train block.")
@_fail_cleanly
def search(params_path: Path, write_back: bool) -> None:
    """Grid search over train params (params `search.grid`), scored on the validation split.

    Needs the augmented dataset (run the stages up to augment first). Prints the comparison
    table; the same table is a Prefect markdown artifact.
    """
    from hemaflow.flows.search import run_search
    from hemaflow.tasks.search import grid_points

    try:
        grid_points(load_params(params_path).search.grid)
    except ValueError as exc:
        raise click.ClickException(f"{params_path}: {exc}") from exc
    _quiet_user_errors_in_logs()
    best = run_search(params_path, write_back)
    p = load_params(params_path)
    click.echo((params_path.resolve().parent / p.search.out_dir / "results.md").read_text())
    click.echo(f"best: {best['trial']} ({best['metric']} {best['value']:.4f})"
               + (f"; written back into {params_path}" if write_back else
                  f"; see {params_path.resolve().parent / p.search.out_dir / 'best_params.yaml'}"))


@app.command("data-status")
@params_option
@_fail_cleanly
def data_status(params_path: Path) -> None:
    """Say whether the versioned raw data (data.dvc) differs from what the pipeline last ran on."""
    from hemaflow.flows.schedules import data_change

    status = data_change(params_path.resolve().parent, load_params(params_path))
    click.echo(json.dumps(status, indent=2))


@app.command("label-corrections")
@click.option("--review", "review_csv", type=click.Path(path_type=Path), required=True,
              help="evaluate's label_review.csv (e.g. reports/eval/label_review.csv)")
@click.option("--crops-dir", type=click.Path(path_type=Path), default=None, help="default: paths.crops_dir in params")
@click.option("--label-corrections", "corrections", type=click.Path(path_type=Path), default=None,
              help="default: paths.label_corrections in params")
@params_option
@_fail_cleanly
def label_corrections(review_csv: Path, crops_dir: Path | None, corrections: Path | None, params_path: Path) -> None:
    """Draft undecided rows in the label corrections file from a label review, one per source image.

    Write relabel, drop or keep in each row's action; the next validate-labels applies them."""
    from hemaflow.label_corrections import draft_from_review
    from hemaflow.tasks.stages import stage_paths

    paths = stage_paths(load_params(params_path), params_path.resolve().parent,
                        {"crops_dir": crops_dir, "label_corrections": corrections})
    if paths.label_corrections is None:
        raise click.UsageError("no corrections file: give --label-corrections or set paths.label_corrections")
    counts = draft_from_review(review_csv, paths.crops_dir / "crops.parquet", paths.label_corrections)
    click.echo(f"{paths.label_corrections}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default="data/raw", show_default=True)
@click.option("--n-fields", type=int, default=150, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def generate(out_dir: Path, n_fields: int, seed: int) -> None:
    """Generate the embedded synthetic smear dataset (deterministic)."""
    from hemaflow.progress import tqdm_progress
    from hemaflow.synthetic import generate_dataset

    summary = generate_dataset(out_dir, n_fields=n_fields, seed=seed, progress=tqdm_progress("generate"))
    click.echo(json.dumps(summary, indent=2, default=str))


@app.command()
@click.option("--store-url", default=None, help="Model store (directory or s3://bucket/prefix); default from params.")
@click.option("--model-name", default=None)
@click.option("--model", "--version", "version", default="production", show_default=True,
              help="production, latest or vN.")
@click.option("--dest", "dest_dir", type=click.Path(path_type=Path), default="models/pulled", show_default=True)
@params_option
@_fail_cleanly
@_store_errors_cleanly
def pull(store_url: str | None, model_name: str | None, version: str, dest_dir: Path, params_path: Path) -> None:
    """Download a model version from the model store; every file's sha256 is verified against its card."""
    p = load_params(params_path) if params_path.is_file() else Params()
    url = resolve_store_url(store_url or p.promote.store_url, params_path)
    name = model_name or p.promote.model_name
    path, mv = pull_model(url, name, version, dest_dir)
    click.echo(f"pulled {name} {mv.tag} ({version}) from {url} to {path}; sha256 of every file verified")


def _stage_command(name: str):
    spec = STAGES[name]

    @_fail_cleanly
    def command(params_path: Path, **paths: Path | None) -> None:
        from hemaflow.progress import tqdm_progress
        from hemaflow.tasks.stages import run_stage

        root = params_path.resolve().parent
        if params_path.name == "params.yaml" and (root / "dvc.yaml").is_file():  # `dvc repro` runs these
            require_no_extends(params_path)
        params = load_params(params_path)
        overrides = {k: v.resolve() for k, v in paths.items() if v is not None}
        result = run_stage(name, params, root, overrides, progress=tqdm_progress(name))
        for k, v in result.summary().items():
            click.echo(f"{k}: {v}")

    command.__doc__ = spec.help
    command = params_option(command)
    for field in reversed(spec.inputs + spec.outputs):
        command = click.option(f"--{field.replace('_', '-')}", field, type=click.Path(path_type=Path), default=None,
                               help=f"default: paths.{field} in params")(command)
    return app.command(name=name.replace("_", "-"), help=spec.help)(command)


for _name in STAGES:
    _stage_command(_name)

app.add_command(models_group)
