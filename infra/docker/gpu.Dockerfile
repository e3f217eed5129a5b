# hemaflow GPU training image: the `hemaflow-train-job` flow (train + evaluate) on NVIDIA GPUs.
#   docker build -f infra/docker/gpu.Dockerfile -t hemaflow-gpu:0.1.0 .
# tensorflow[and-cuda] (extra `gpu`) brings CUDA and cuDNN as wheels; the host needs only the
# NVIDIA driver and the container toolkit (docker --gpus / the Kubernetes device plugin).
# Run as a Kubernetes job (pool hemaflow-gpu-k8s), a container of a docker worker
# (hemaflow-gpu-docker), or a process worker on a GPU box (hemaflow-gpu-process).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2 HEMAFLOW_ROOT=/opt/hemaflow

RUN apt-get update && apt-get install -y --no-install-recommends git libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'   # a bind-mounted checkout owned by another uid

WORKDIR /opt/hemaflow
COPY pyproject.toml README.md ./
COPY hemaflow hemaflow
COPY tasks tasks
COPY flows flows
RUN pip install ".[gpu,infra]"
COPY params.yaml prefect.yaml ./

# a training job needs no repository checkout: its inputs come from S3 (flows/gpu_job.py)
CMD ["prefect", "worker", "start", "--pool", "hemaflow-gpu-process", "--type", "process"]
