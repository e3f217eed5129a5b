# hemaflow flow image (CPU): the training flow's CPU stages, the data watch and a process worker.
#   docker build -f infra/docker/flow.Dockerfile -t hemaflow-flow:0.1.0 .
# Installs the project with its exact pins (pyproject.toml) and the work-pool extras
# (prefect-kubernetes, prefect-docker), so the same image can also run a docker worker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2 HEMAFLOW_ROOT=/opt/hemaflow

# git: DVC and the promotion record (commit of the project); libglib: OpenCV
RUN apt-get update && apt-get install -y --no-install-recommends git libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'   # a bind-mounted checkout owned by another uid

WORKDIR /opt/hemaflow
# dependencies first (cached layer), then the code
COPY pyproject.toml README.md ./
COPY hemaflow hemaflow
COPY tasks tasks
COPY flows flows
RUN pip install ".[infra]"
COPY dvc.yaml params.yaml prefect.yaml data.dvc ./
COPY infra/kubernetes infra/kubernetes
COPY infra/docker infra/docker
COPY infra/team infra/team

CMD ["prefect", "worker", "start", "--pool", "hemaflow-cpu", "--type", "process"]
