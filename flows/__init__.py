"""hemaflow.flows: orchestration and the command line (the outermost layer).

Prefect flows wire the stages of hemaflow.tasks (retries, skip-if-unchanged, artifacts,
Dask dispatch); cli.py is the `hemaflow` command. Nothing in hemaflow or hemaflow.tasks
imports from here.
"""
