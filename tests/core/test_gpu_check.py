"""``make gpu-check`` (tools/gpu_check.sh) on a machine without a GPU: a clear, immediate failure."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_visible():
    smi = shutil.which("nvidia-smi")
    listed = smi and subprocess.run([smi, "-L"], capture_output=True, text=True).stdout
    return bool(listed and listed.startswith("GPU")) or os.path.exists("/dev/nvidia0")


@pytest.mark.skipif(_gpu_visible(), reason="a GPU is visible: gpu-check would run for real")
def test_gpu_check_without_a_gpu_fails_at_once_saying_so(tmp_path):
    result = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode != 0
    assert "no CUDA GPU" in result.stdout
    assert "no CUDA GPU" in (tmp_path / "summary.txt").read_text()
    assert not (tmp_path / "setup.log").exists()        # nothing was installed or run
