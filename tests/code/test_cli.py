import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _cli(*args, cwd=None):
    return subprocess.run([str(BIN / "hemaflow"), *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_command():
    out = _cli("--help").stdout
    for cmd in ("run", "generate", "pull", "ingest", "validate-labels", "segment", "split", "augment",
                "check-quality", "train", "evaluate", "promote"):
        assert f"  {cmd} " in out, cmd


def test_stage_error_names_the_file_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("base:\n  seed: 1\n")
    res = _cli("validate-labels", "--manifest-path", str(tmp_path / "absent.parquet"), cwd=tmp_path)
    assert res.returncode == 1
    assert "absent.parquet: manifest not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_params_file_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: many\n")
    res = _cli("ingest", cwd=tmp_path)
    assert res.returncode == 1 and "params.yaml: invalid parameters" in res.stderr and "epochs" in res.stderr
