"""Prefect flows: wiring only (retries, skip-if-unchanged, artifacts). Stage logic lives in tasks/."""
