"""Data-quality gate: Great Expectations suites over the clean label table and the final
dataset table (each split), before training.

The model is only as good as the table it learns from: this stage stops the run when the
clean table has nulls, unknown classes, duplicate content or too few / too unbalanced
classes, or when a split misses a class, is too imbalanced, drifts from the overall class
mix, or shares a source image or near-duplicate group (validate_labels' group_id) with
another split (leakage), and says in plain words which class and by how much.
Derived tables (counts per split x class, balance per split, splits per source) are built
with pandas and checked with expectations, so every verdict is a GX validation result.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from hemaflow.config import CheckQualityParams
from hemaflow.errors import read_table
from hemaflow.schema import CLEAN_COLUMNS, DATASET_COLUMNS

SPLITS = ("train", "val", "test")
STRING_COLUMNS = ("path", "label", "split", "source_id", "source_sha256", "crop_id")
SOURCE_KEYS = ("source_sha256", "source_id")
GROUP_KEY = "group_id"   # near-duplicate group, joined from clean.parquet on source_id
CLEAN_REQUIRED = ("image_id", "path", "sha256", "label", "group_id")  # never null in the clean table
MAX_EXAMPLES = 5


class QualityGateError(Exception):
    """The dataset failed the quality gate; the message lists each failure in plain words.

    `result` carries the full QualityResult so a caller can still publish the report.
    """

    def __init__(self, dataset_path: Path, failures: list[str], report_path: Path,
                 result: "QualityResult | None" = None):
        self.dataset_path = Path(dataset_path)
        self.failures = failures
        self.report_path = Path(report_path)
        self.result = result
        lines = "\n".join(f"  - {f}" for f in failures)
        super().__init__(
            f"{dataset_path}: data-quality gate failed ({len(failures)} problem(s), "
            f"report: {report_path}):\n{lines}"
        )


@dataclass(frozen=True)
class CheckRow:
    """One expectation's verdict, as a line of the report."""

    suite: str
    expectation: str
    column: str
    scope: str
    passed: bool
    observed: str
    threshold: str
    problems: tuple[str, ...] = ()


@dataclass
class QualityResult:
    success: bool
    counts: dict[str, dict[str, int]]      # split -> class -> rows (augmented included)
    originals: dict[str, dict[str, int]]   # split -> class -> original (not augmented) rows
    checks: list[CheckRow]
    failures: list[str]                    # readable lines, one per problem
    markdown: str                          # the report, e.g. for a Prefect artifact
    result_path: Path
    report_path: Path
    clean_counts: dict[str, int] | None = None  # class -> images in the clean table (None: not checked)

    def summary(self) -> dict:
        """Plain-JSON record for metrics files and Prefect artifacts."""
        out = {
            "success": self.success,
            "n_rows": sum(sum(c.values()) for c in self.counts.values()),
            "n_checks": len(self.checks),
            "n_failed_checks": sum(not c.passed for c in self.checks),
            "failures": self.failures,
            "counts": self.counts,
            "originals": self.originals,
        }
        if self.clean_counts is not None:
            out["clean_counts"] = self.clean_counts
        return out


# A check's describer turns a GX result dict into (observed text, readable problems).
Describer = Callable[[dict], tuple[str, list[str]]]


@dataclass
class PlannedCheck:
    expectation: Any   # a gx.expectations.* instance
    column: str
    scope: str
    threshold: str
    describe: Describer


@dataclass
class SuitePlan:
    name: str
    frame: pd.DataFrame
    result_format: str
    checks: list[PlannedCheck] = field(default_factory=list)


def check_quality(
    dataset_path: Path, quality_dir: Path, cfg: CheckQualityParams, classes: tuple[str, ...],
    clean_path: Path | None = None,
) -> QualityResult:
    """Validate the clean table (if given) and the dataset table; write result.json and report.md;
    raise QualityGateError on failure."""
    df = read_dataset(dataset_path)
    clean = read_clean(clean_path) if clean_path is not None else None
    clean_counts = None
    plans = []
    if clean is not None:
        df = attach_groups(df, clean)
        clean_counts = {c: int((clean["label"] == c).sum()) for c in classes}
        plans += plan_clean_suites(clean, cfg, classes)
    plans += plan_suites(df, cfg, classes)
    validations = run_suites(plans)
    checks = [
        row_from_result(plan.name, planned, result)
        for plan, (_, results) in zip(plans, validations)
        for planned, result in zip(plan.checks, results)
    ]
    failures = [p for c in checks for p in c.problems]
    counts = count_by_split(df, classes, originals_only=False)
    originals = count_by_split(df, classes, originals_only=True)
    quality_dir = Path(quality_dir)
    quality_dir.mkdir(parents=True, exist_ok=True)
    result_path, report_path = quality_dir / "result.json", quality_dir / "report.md"
    markdown = render_report(dataset_path, checks, failures, counts, originals, classes, clean_counts)
    result = QualityResult(
        success=not failures and all(c.passed for c in checks),
        counts=counts, originals=originals, checks=checks, failures=failures,
        markdown=markdown, result_path=result_path, report_path=report_path, clean_counts=clean_counts,
    )
    payload = {
        "dataset_path": str(dataset_path),
        "clean_path": None if clean_path is None else str(clean_path),
        "summary": result.summary(),
        "checks": [asdict(c) for c in checks],
        "validation_results": {plan.name: raw for plan, (raw, _) in zip(plans, validations)},
    }
    result_path.write_text(json.dumps(to_plain_json(payload), indent=2))
    report_path.write_text(markdown)
    if not result.success:
        raise QualityGateError(
            dataset_path, failures or ["an expectation failed; see the report"], report_path, result)
    return result


def read_dataset(dataset_path: Path) -> pd.DataFrame:
    """Load the dataset table; a missing file or column raises StageInputError naming the file."""
    return read_table(dataset_path, "dataset table", DATASET_COLUMNS).reset_index(drop=True)


def read_clean(clean_path: Path) -> pd.DataFrame:
    """Load validate_labels' clean table; it must at least name images, labels and groups."""
    return read_table(clean_path, "clean label table", ("image_id", "label", GROUP_KEY)).reset_index(drop=True)


def attach_groups(df: pd.DataFrame, clean: pd.DataFrame) -> pd.DataFrame:
    """Dataset rows + the near-duplicate group of their source image (NaN if the source is not in clean)."""
    groups = clean.drop_duplicates("image_id").set_index("image_id")[GROUP_KEY]
    return df.assign(**{GROUP_KEY: df["source_id"].astype(str).map(groups)})


# ---------------------------------------------------------------- derived tables

def originals_mask(df: pd.DataFrame) -> pd.Series:
    """Rows that are source crops, not augmentation output (augmented is exactly False)."""
    return df["augmented"].map(lambda v: isinstance(v, (bool, np.bool_)) and not v).astype(bool)


def count_by_split(df: pd.DataFrame, classes: tuple[str, ...], originals_only: bool) -> dict[str, dict[str, int]]:
    rows = df[originals_mask(df)] if originals_only else df
    table = pd.crosstab(rows["split"], rows["label"]).reindex(index=list(SPLITS), columns=list(classes), fill_value=0)
    return {s: {c: int(table.loc[s, c]) for c in classes} for s in SPLITS}


def build_class_counts(df: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """One row per split x taxonomy class (zeros included): all rows and original rows."""
    counts = count_by_split(df, classes, originals_only=False)
    originals = count_by_split(df, classes, originals_only=True)
    return pd.DataFrame(
        [{"split": s, "label": c, "rows": counts[s][c], "originals": originals[s][c]} for s in SPLITS for c in classes]
    )


def build_split_balance(class_counts: pd.DataFrame) -> pd.DataFrame:
    """One row per split: largest and smallest class (all rows) and their ratio (inf if one is empty)."""
    records = []
    for s in SPLITS:
        sub = class_counts[class_counts["split"] == s].sort_values(["rows", "label"], kind="stable")
        small, large = sub.iloc[0], sub.iloc[-1]
        ratio = large["rows"] / small["rows"] if small["rows"] > 0 else math.inf
        records.append({
            "split": s, "largest_class": large["label"], "largest": int(large["rows"]),
            "smallest_class": small["label"], "smallest": int(small["rows"]), "ratio": float(ratio),
        })
    return pd.DataFrame(records)


def build_sources(df: pd.DataFrame) -> pd.DataFrame:
    """One row per source (by hash and by id): how many splits its rows sit in, and which."""
    frames = []
    for key in SOURCE_KEYS + ((GROUP_KEY,) if GROUP_KEY in df.columns else ()):
        rows = df.dropna(subset=[key])
        grouped = rows.groupby(key, sort=True)
        frames.append(pd.DataFrame({
            "key": key,
            "source": grouped.size().index.astype(str),
            "n_splits": grouped["split"].nunique().to_numpy(),
            "splits": grouped["split"].agg(lambda s: "+".join(sorted(map(str, s.dropna().unique())))).to_numpy(),
            "source_id": grouped["source_id"].first().astype(str).to_numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def kl_partition(df: pd.DataFrame) -> dict | None:
    """Label shares of all original rows: the expected partition for each split's originals."""
    labels = df.loc[originals_mask(df), "label"].dropna()
    if labels.empty:
        return None
    shares = labels.value_counts(normalize=True).sort_index()
    weights = [float(w) for w in shares.to_numpy()]
    weights[-1] = 1.0 - sum(weights[:-1])  # exact sum 1 for GX's partition check
    return {"values": [str(v) for v in shares.index], "weights": weights}


# ---------------------------------------------------------------- suites

def plan_suites(df: pd.DataFrame, cfg: CheckQualityParams, classes: tuple[str, ...]) -> list[SuitePlan]:
    """Every expectation of the gate, with the threshold and the wording of its failures."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    class_counts = build_class_counts(df, classes)
    balance = build_split_balance(class_counts)
    sources = build_sources(df)

    schema = SuitePlan("schema", df, "SUMMARY")
    schema.checks.append(PlannedCheck(
        E.ExpectTableColumnsToMatchSet(column_set=list(DATASET_COLUMNS), exact_match=False),
        "(all)", "table", "contains " + ", ".join(DATASET_COLUMNS), describe_columns))
    for col in (*STRING_COLUMNS, "augmented"):
        type_ = "bool" if col == "augmented" else "str"
        schema.checks.append(PlannedCheck(
            E.ExpectColumnValuesToBeOfType(column=col, type_=type_), col, "table", type_,
            describe_type(col, type_)))

    completeness = SuitePlan("completeness", df, "SUMMARY")
    for col in DATASET_COLUMNS:
        completeness.checks.append(PlannedCheck(
            E.ExpectColumnValuesToNotBeNull(column=col), col, "table", "no nulls", describe_nulls(df, col)))

    taxonomy = SuitePlan("taxonomy", df, "SUMMARY")
    for col, allowed in (("label", tuple(classes)), ("split", SPLITS)):
        taxonomy.checks.append(PlannedCheck(
            E.ExpectColumnValuesToBeInSet(column=col, value_set=list(allowed)), col, "table",
            "in {" + ", ".join(allowed) + "}", describe_outside_set(col, allowed)))

    minimum = SuitePlan("class_minimum", class_counts, "COMPLETE")
    for s in SPLITS:
        minimum.checks.append(PlannedCheck(
            E.ExpectColumnValuesToBeBetween(
                column="originals", min_value=cfg.min_per_class, row_condition=Column("split") == s),
            "originals", s, f">= {cfg.min_per_class} per class", describe_minimum(class_counts, cfg.min_per_class)))

    imbalance = SuitePlan("class_imbalance", balance, "COMPLETE")
    for s in cfg.imbalance_splits:
        imbalance.checks.append(PlannedCheck(
            E.ExpectColumnValuesToBeBetween(
                column="ratio", max_value=cfg.max_imbalance_ratio, row_condition=Column("split") == s),
            "ratio", s, f"<= {cfg.max_imbalance_ratio:g}", describe_imbalance(balance, s, cfg.max_imbalance_ratio)))

    distribution = SuitePlan("class_distribution", df, "SUMMARY")
    partition = kl_partition(df)
    if partition is not None:  # no originals at all: class_minimum already fails every split
        for s in SPLITS:
            distribution.checks.append(PlannedCheck(
                E.ExpectColumnKLDivergenceToBeLessThan(
                    column="label", partition_object=partition, threshold=cfg.max_kl_divergence,
                    row_condition=(Column("split") == s) & (Column("augmented") == False)),  # noqa: E712
                "label", f"{s} originals", f"KL <= {cfg.max_kl_divergence:g}",
                describe_kl(s, cfg.max_kl_divergence)))

    leakage = SuitePlan("leakage", sources, "COMPLETE")
    for key in SOURCE_KEYS + ((GROUP_KEY,) if GROUP_KEY in df.columns else ()):
        leakage.checks.append(PlannedCheck(
            E.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1, row_condition=Column("key") == key),
            "n_splits", f"per {key}", "1 split", describe_leakage(sources, key)))

    held_out = SuitePlan("held_out_originals", df, "SUMMARY")
    held_out.checks.append(PlannedCheck(
        E.ExpectColumnValuesToBeInSet(
            column="augmented", value_set=[False], row_condition=Column("split").is_in(["val", "test"])),
        "augmented", "val+test", "False", describe_held_out(df)))

    plans = [schema, completeness, taxonomy, minimum, imbalance, distribution, leakage, held_out]
    if GROUP_KEY in df.columns:  # every row must trace back to an image of the clean table
        lineage = SuitePlan("lineage", df, "SUMMARY")
        lineage.checks.append(PlannedCheck(
            E.ExpectColumnValuesToNotBeNull(column=GROUP_KEY), GROUP_KEY, "table", "source_id in clean table",
            describe_lineage(df)))
        plans.append(lineage)
    return plans


def build_clean_counts(clean: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """One row per taxonomy class (zeros included): images in the clean table."""
    counts = clean["label"].value_counts().reindex(list(classes), fill_value=0)
    return pd.DataFrame({"label": list(classes), "images": [int(v) for v in counts.to_numpy()]})


def build_clean_balance(counts: pd.DataFrame) -> pd.DataFrame:
    sub = counts.sort_values(["images", "label"], kind="stable")
    small, large = sub.iloc[0], sub.iloc[-1]
    ratio = large["images"] / small["images"] if small["images"] > 0 else math.inf
    return pd.DataFrame([{"largest_class": large["label"], "largest": int(large["images"]),
                          "smallest_class": small["label"], "smallest": int(small["images"]), "ratio": float(ratio)}])


def plan_clean_suites(clean: pd.DataFrame, cfg: CheckQualityParams, classes: tuple[str, ...]) -> list[SuitePlan]:
    """Suites on validate_labels' clean table: what every split is cut from."""
    import great_expectations as gx

    E = gx.expectations
    schema = SuitePlan("clean_schema", clean, "COMPLETE")
    schema.checks.append(PlannedCheck(
        E.ExpectTableColumnsToMatchSet(column_set=list(CLEAN_COLUMNS), exact_match=False),
        "(all)", "clean", "contains " + ", ".join(CLEAN_COLUMNS), describe_columns))
    for col, what in (("sha256", "identical content twice"), ("image_id", "one image id twice")):
        if col in clean.columns:
            schema.checks.append(PlannedCheck(
                E.ExpectColumnValuesToBeUnique(column=col), col, "clean", "unique",
                describe_not_unique(clean, col, what)))
    if "error" in clean.columns:
        schema.checks.append(PlannedCheck(
            E.ExpectColumnValuesToBeNull(column="error"), "error", "clean", "null",
            describe_clean_errors(clean)))

    completeness = SuitePlan("clean_completeness", clean, "COMPLETE")
    for col in CLEAN_REQUIRED:
        if col in clean.columns:
            completeness.checks.append(PlannedCheck(
                E.ExpectColumnValuesToNotBeNull(column=col), col, "clean", "no nulls",
                describe_nulls(clean, col, id_col="image_id", scope="clean")))

    taxonomy = SuitePlan("clean_taxonomy", clean, "SUMMARY")
    taxonomy.checks.append(PlannedCheck(
        E.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)), "label", "clean",
        "in {" + ", ".join(classes) + "}", describe_outside_set("label", tuple(classes), scope="clean")))

    min_count = cfg.min_per_class if cfg.clean_min_per_class is None else cfg.clean_min_per_class
    max_ratio = cfg.max_imbalance_ratio if cfg.clean_max_imbalance_ratio is None else cfg.clean_max_imbalance_ratio
    counts = build_clean_counts(clean, classes)
    minimum = SuitePlan("clean_class_minimum", counts, "COMPLETE")
    minimum.checks.append(PlannedCheck(
        E.ExpectColumnValuesToBeBetween(column="images", min_value=min_count),
        "images", "clean", f">= {min_count} per class", describe_clean_minimum(counts, min_count)))

    balance = build_clean_balance(counts)
    imbalance = SuitePlan("clean_class_imbalance", balance, "COMPLETE")
    imbalance.checks.append(PlannedCheck(
        E.ExpectColumnValuesToBeBetween(column="ratio", max_value=max_ratio),
        "ratio", "clean", f"<= {max_ratio:g}", describe_clean_imbalance(balance, max_ratio)))
    return [schema, completeness, taxonomy, minimum, imbalance]


def run_suites(plans: list[SuitePlan]) -> list[tuple[dict, list[dict]]]:
    """Validate each suite on its table in one ephemeral GX context.

    Returns per suite the serialized validation result and its expectation results in the
    order of plan.checks (matched through each expectation's meta, not result order).
    """
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    source = context.data_sources.add_pandas("hemaflow")
    out = []
    for plan in plans:
        batch = (
            source.add_dataframe_asset(plan.name)
            .add_batch_definition_whole_dataframe("whole")
            .get_batch(batch_parameters={"dataframe": plan.frame})
        )
        suite = gx.ExpectationSuite(name=plan.name)
        for i, planned in enumerate(plan.checks):
            planned.expectation.meta = {"check": i}
            suite.add_expectation(planned.expectation)
        validation = batch.validate(suite, result_format=plan.result_format)
        raw = validation.to_json_dict()
        by_index = {r["expectation_config"]["meta"]["check"]: r for r in raw["results"]}
        out.append((raw, [by_index[i] for i in range(len(plan.checks))]))
    return out


def row_from_result(suite: str, planned: PlannedCheck, result: dict) -> CheckRow:
    info = result.get("exception_info") or {}
    if info.get("raised_exception"):
        problem = (f"{suite}: {result['expectation_config']['type']} on {planned.column} ({planned.scope}) "
                   f"could not run: {info.get('exception_message')}")
        observed, problems = "error", [problem]
    else:
        observed, problems = planned.describe(result.get("result") or {})
        if result["success"]:
            problems = []
        elif not problems:  # failed but the describer found nothing specific: still say so
            problems = [f"{suite}: {result['expectation_config']['type']} failed on {planned.column} ({planned.scope})"]
    return CheckRow(
        suite=suite, expectation=result["expectation_config"]["type"], column=planned.column,
        scope=planned.scope, passed=bool(result["success"]) and not info.get("raised_exception"),
        observed=observed, threshold=planned.threshold, problems=tuple(problems),
    )


# ---------------------------------------------------------------- wording of results

def examples(items: list, n: int = MAX_EXAMPLES) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def unexpected_rows(result: dict) -> list[int]:
    return list(result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or [])


def describe_columns(result: dict) -> tuple[str, list[str]]:
    missing = (result.get("details") or {}).get("mismatched", {}).get("missing") or []
    return f"{len(result.get('observed_value') or [])} columns", [f"schema: missing column(s) {', '.join(missing)}"]


def describe_type(col: str, type_: str) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        if "observed_value" in result:  # judged on the column dtype
            observed = str(result["observed_value"])
            return observed, [f"schema: column {col} has type {observed}, expected {type_}"]
        bad = [repr(v) for v in result.get("partial_unexpected_list", [])]
        n = result.get("unexpected_count", 0)
        return f"{n} not {type_}", [f"schema: {n} value(s) of {col} are not {type_} (e.g. {examples(bad)})"]
    return describe


def describe_nulls(df: pd.DataFrame, col: str, id_col: str = "crop_id", scope: str = "") -> Describer:
    prefix = f"{scope}: " if scope else ""

    def describe(result: dict) -> tuple[str, list[str]]:
        n = int(result.get("unexpected_count", 0))
        rows = unexpected_rows(result)
        ids = [f"row {i} ({df.at[i, id_col]})" if pd.notna(df.at[i, id_col]) else f"row {i}" for i in rows]
        return f"{n} null", [f"{prefix}null: {n} row(s) have no {col}: {examples(ids)}"]
    return describe


def describe_outside_set(col: str, allowed: tuple[str, ...], scope: str = "") -> Describer:
    prefix = f"{scope}: " if scope else ""

    def describe(result: dict) -> tuple[str, list[str]]:
        n = int(result.get("unexpected_count", 0))
        values = [f"{c['value']!r} x{c['count']}" for c in result.get("partial_unexpected_counts", [])]
        what = "outside the taxonomy" if col == "label" else "not a known split"
        return f"{n} outside", [f"{prefix}{col}: {n} row(s) {what} ({', '.join(allowed)}): {examples(values)}"]
    return describe


def describe_not_unique(clean: pd.DataFrame, col: str, what: str) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        rows = unexpected_rows(result)
        ids = [f"{clean.at[i, 'image_id']} ({str(clean.at[i, col])[:12]})" for i in rows]
        return f"{len(rows)} repeated", [f"clean: {len(rows)} row(s) share a {col} ({what}): {examples(ids)}"]
    return describe


def describe_clean_errors(clean: pd.DataFrame) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        rows = unexpected_rows(result)
        ids = [f"{clean.at[i, 'image_id']} ({clean.at[i, 'error']})" for i in rows]
        return f"{len(rows)} with error", [f"clean: {len(rows)} row(s) carry an ingest error: {examples(ids)}"]
    return describe


def describe_clean_minimum(counts: pd.DataFrame, minimum: int) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        problems = []
        for i in unexpected_rows(result):
            row = counts.loc[i]
            if row["images"] == 0:
                problems.append(f"clean: {row['label']} is missing (0 < {minimum}, clean_min_per_class)")
            else:
                problems.append(f"clean: {row['label']} has {row['images']} < {minimum} images "
                                f"({minimum - row['images']} short, clean_min_per_class)")
        return f"{len(problems)} class(es) short", problems
    return describe


def describe_clean_imbalance(balance: pd.DataFrame, max_ratio: float) -> Describer:
    row = balance.iloc[0]

    def describe(result: dict) -> tuple[str, list[str]]:
        ratio = f"{row['ratio']:.2f}" if math.isfinite(row["ratio"]) else "inf"
        return ratio, [f"clean: imbalance {ratio} > {max_ratio:g} "
                       f"({row['largest_class']} {row['largest']} / {row['smallest_class']} {row['smallest']})"]
    return describe


def describe_lineage(df: pd.DataFrame) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        n = int(result.get("unexpected_count", 0))
        ids = sorted({str(df.at[i, "source_id"]) for i in unexpected_rows(result)})
        return f"{n} unmatched", [f"lineage: {n} row(s) have a source_id not in the clean table: {examples(ids)}"]
    return describe


def describe_minimum(class_counts: pd.DataFrame, minimum: int) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        problems = []
        for i in unexpected_rows(result):
            row = class_counts.loc[i]
            extra = f", {row['rows']} rows with augmentation" if row["rows"] != row["originals"] else ""
            if row["originals"] == 0:
                problems.append(f"{row['split']}: {row['label']} is missing (0 < {minimum}, min_per_class{extra})")
            else:
                problems.append(
                    f"{row['split']}: {row['label']} has {row['originals']} < {minimum} "
                    f"(min_per_class, original images{extra})")
        return f"{len(problems)} class(es) short", problems
    return describe


def describe_imbalance(balance: pd.DataFrame, split: str, max_ratio: float) -> Describer:
    row = balance.set_index("split").loc[split]

    def describe(result: dict) -> tuple[str, list[str]]:
        ratio = f"{row['ratio']:.2f}" if math.isfinite(row["ratio"]) else "inf"
        return ratio, [
            f"{split}: imbalance {ratio} > {max_ratio:g} "
            f"({row['largest_class']} {row['largest']} / {row['smallest_class']} {row['smallest']})"
        ]
    return describe


def describe_kl(split: str, threshold: float) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        value = result.get("observed_value")
        details = result.get("details") or {}
        observed = details.get("observed_partition") or {}
        expected = details.get("expected_partition") or {}
        if not observed.get("weights") or not any(observed["weights"]):
            return "no rows", [f"{split}: no original rows to compare with the overall class mix"]
        shares = [
            (abs(o - e), label, o, e)
            for label, o, e in zip(observed["values"], observed["weights"], expected["weights"])
        ]
        worst = ", ".join(f"{lab} {o:.1%} vs {e:.1%}" for _, lab, o, e in sorted(shares, reverse=True)[:3])
        shown = "inf" if value is None else f"{value:.3f}"
        return shown, [f"{split}: label distribution KL {shown} > {threshold:g} vs all originals ({worst})"]
    return describe


def describe_leakage(sources: pd.DataFrame, key: str) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        rows = sources.loc[unexpected_rows(result)]
        items = [
            f"{r.source_id} ({r.splits})" if key == "source_id"
            else f"group {r.source} ({r.splits})" if key == GROUP_KEY
            else f"{r.source[:12]}.. = {r.source_id} ({r.splits})"
            for r in rows.itertuples()
        ]
        n = int(result.get("unexpected_count", len(items)))
        return f"{n} in >1 split", [f"leakage: {n} source image(s) in more than one split (by {key}): {examples(items)}"]
    return describe


def describe_held_out(df: pd.DataFrame) -> Describer:
    def describe(result: dict) -> tuple[str, list[str]]:
        n = int(result.get("unexpected_count", 0))
        ids = [str(df.at[i, "crop_id"]) for i in unexpected_rows(result)]
        return f"{n} augmented", [f"leakage: {n} augmented row(s) in val/test, which must hold originals only: {examples(ids)}"]
    return describe


# ---------------------------------------------------------------- outputs

def render_report(
    dataset_path: Path, checks: list[CheckRow], failures: list[str],
    counts: dict[str, dict[str, int]], originals: dict[str, dict[str, int]], classes: tuple[str, ...],
    clean_counts: dict[str, int] | None = None,
) -> str:
    """Markdown a person reads first: verdict, failures in words, every check, counts."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    verdict = "PASSED" if not failures and all(c.passed for c in checks) else "FAILED"
    lines = [f"# Data-quality gate: {verdict}", "", f"Dataset: `{dataset_path}`", ""]
    if failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    lines += ["## Checks", "", "| suite | expectation | column | scope | passed | observed | threshold |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        lines.append("| " + " | ".join(cell(v) for v in (
            c.suite, c.expectation, c.column, c.scope, "yes" if c.passed else "**NO**", c.observed, c.threshold)) + " |")
    lines += ["", "## Rows per split and class (originals in brackets)", "",
              "| split | " + " | ".join(classes) + " | total |", "| --- " * (len(classes) + 2) + "|"]
    for s in SPLITS:
        per = [f"{counts[s][c]} ({originals[s][c]})" for c in classes]
        total = f"{sum(counts[s].values())} ({sum(originals[s].values())})"
        lines.append(f"| {s} | " + " | ".join(per) + f" | {total} |")
    if clean_counts is not None:
        lines += ["", "## Images per class in the clean table", "",
                  "| " + " | ".join(classes) + " | total |", "| --- " * (len(classes) + 1) + "|",
                  "| " + " | ".join(str(clean_counts[c]) for c in classes) + f" | {sum(clean_counts.values())} |"]
    return "\n".join(lines) + "\n"


def to_plain_json(value: Any) -> Any:
    """Strict JSON: infinities and NaN (GX may report them) become strings / null."""
    if isinstance(value, dict):
        return {str(k): to_plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain_json(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return to_plain_json(value.item())
    return value
