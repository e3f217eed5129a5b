"""Device/strategy selection, including the multi-replica path on logical CPUs (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from pydantic import ValidationError

from hemaflow.config import TrainParams
from hemaflow.devices import (DeviceConfigError, cpu_has_bf16, describe_strategy, resolve_precision,
                              select_strategy)

ROOT = Path(__file__).resolve().parents[2]
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only fallback")
def test_auto_without_gpu_is_the_default_single_replica_strategy():
    info = describe_strategy(select_strategy("auto"))
    assert info["replicas"] == 1 and info["physical_gpus"] == 0
    assert "CPU" in info["devices"][0]


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only fallback")
def test_gpu_requested_without_gpu_is_a_clear_error():
    with pytest.raises(DeviceConfigError, match="no GPU"):
        select_strategy("gpu")


def test_cpu_is_one_device():
    assert describe_strategy(select_strategy("cpu"))["strategy"] == "OneDeviceStrategy"


@pytest.mark.parametrize("spec", ["tpu", "cpu:0", "cpu:x", "gpu:2", ""])
def test_bad_spec_is_refused_by_strategy_and_params(spec):
    with pytest.raises(ValueError, match="auto, cpu, gpu or cpu:N"):
        select_strategy(spec)
    with pytest.raises(ValidationError, match="devices"):
        TrainParams(devices=spec)


def test_logical_cpus_after_tf_initialised_say_what_to_do():
    tf.constant(1.0) + 1  # make sure this process's devices are initialised
    with pytest.raises(DeviceConfigError, match="cpu:3 needs 3 logical CPU devices.*fresh process"):
        select_strategy("cpu:3")


TRAIN_ON_TWO_CPUS = """
import json, sys
from pathlib import Path
from hemaflow.config import TrainParams
from hemaflow.tasks.train import train_model
from tests.code.synthetic_wbc import CLASSES, write_dataset
root = Path(sys.argv[1])
write_dataset(root / "data", {"train": 3, "val": 1})
cfg = TrainParams(image_size=32, epochs=1, batch_size=6, devices="cpu:2", online_augmentation=True)
result = train_model(root / "data", root / "model", cfg, CLASSES, seed=1)
print(json.dumps({"epochs_run": result.epochs_run, **result.strategy}))
"""


def test_one_epoch_mirrored_over_two_logical_cpus(tmp_path):
    """The multi-GPU code path (MirroredStrategy, 2 replicas) in a fresh process, where
    logical devices can still be configured."""
    proc = subprocess.run([sys.executable, "-c", TRAIN_ON_TWO_CPUS, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["strategy"] == "MirroredStrategy" and info["replicas"] == 2
    assert [d.split("/")[-1] for d in info["devices"]] == ["device:CPU:0", "device:CPU:1"]
    assert info["epochs_run"] == 1
    assert (tmp_path / "model" / "model.keras").stat().st_size > 10_000


EPYC_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
XEON_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_bf16_is_detected_from_the_cpu_flags():
    assert not cpu_has_bf16(EPYC_AVX2) and cpu_has_bf16(XEON_AMX) and not cpu_has_bf16("")


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU choice")
def test_auto_precision_follows_this_cpu_and_named_ones_pass_through():
    expected = "mixed_bfloat16" if cpu_has_bf16() else "float32"
    assert resolve_precision("auto", select_strategy("auto")) == expected == resolve_precision("auto")
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert resolve_precision("float32") == "float32"
    assert TrainParams(precision="auto").precision == "auto"
    with pytest.raises(ValidationError):
        TrainParams(precision="bf16")
