"""hemaflow.tasks: the pipeline stages, one module per stage, plain Python (no Prefect, no DVC).

ingest -> validate_labels -> segment -> split -> augment -> check_quality -> train -> evaluate -> promote

stages.py is the one table of which paths and params each stage reads and writes; the
flows, `dvc repro` (through the CLI) and the CLI all call its run_stage.
"""
