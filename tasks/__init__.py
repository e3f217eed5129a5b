"""Pipeline stages: one module per stage, plain Python (no Prefect, no DVC).

ingest -> validate_labels -> segment -> split -> augment -> check_quality -> train -> evaluate -> promote
"""
