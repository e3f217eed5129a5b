#!/usr/bin/env bash
# One-time team set-up against the compose services (run by `docker compose up` as `setup`):
# the MinIO bucket, the work pools from infra/'s templates, the deployments of prefect.yaml.
# Safe to run again: every step replaces or keeps what is there.
set -euo pipefail
cd "${HEMAFLOW_ROOT:-/opt/hemaflow}"

python - <<'PY'
import boto3
s3 = boto3.client("s3")
if "hemaflow" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
    s3.create_bucket(Bucket="hemaflow")
print("bucket hemaflow ready")
PY

prefect work-pool create hemaflow-cpu --type process --overwrite
prefect work-pool create hemaflow-gpu-process --type process --overwrite
prefect work-pool create hemaflow-gpu-docker --type docker --overwrite \
  --base-job-template infra/docker/base-job-template.json
prefect work-pool create hemaflow-gpu-k8s --type kubernetes --overwrite \
  --base-job-template infra/kubernetes/base-job-template.json

prefect --no-prompt deploy --all
prefect deployment ls
