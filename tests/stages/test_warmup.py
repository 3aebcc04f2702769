"""``arraybn warmup``: the pipeline on a synthetic set, nothing left behind, a first run that
compiles nothing."""
import os
import subprocess
import sys

from arraybn.stages import warmup
from tests.data.idx_files import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_warm_up_runs_every_model_and_dtype_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(warmup.tempfile, "tempdir", str(tmp_path))
    lines = []
    seconds = warmup.warm_up(("lenet5", "mlp"), ("float32", "float64"), backend="numpy",
                             echo=lines.append)
    assert sorted(seconds) == [("lenet5", "float32"), ("lenet5", "float64"),
                               ("mlp", "float32"), ("mlp", "float64")]
    assert all(value > 0 for value in seconds.values())
    assert len(lines) == 4 and lines[0].startswith("warmup: lenet5 float32 on numpy: ")
    assert os.listdir(tmp_path) == []


def _arraybn(args, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", "from arraybn_cli.main import cli; cli()",
                           *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_after_warmup_the_first_run_compiles_nothing(tmp_path):
    """Compiles every kernel from an empty cache: about 30 CPU-seconds."""
    notice = "compiling kernels (first run only)"
    cache = tmp_path / "numba-cache"
    assert notice in _arraybn(["warmup"], cache)
    data = write_dataset(tmp_path / "data", n_train=600, n_test=100, size=28)
    for name, options in (("run", []), ("augmented", ["--augment", "--augment-crop", "2"]),
                          ("sgd", ["--optimizer", "sgd"])):
        stderr = _arraybn(["run", str(tmp_path / name), "--epochs", "1", "--data-dir", str(data),
                           "--backend", "numba", *options], cache)
        assert notice not in stderr, name
