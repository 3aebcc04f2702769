"""The kernels' on-disk cache is dropped when any kernel source changes: Numba itself checks only
the file of the kernel it loads, not the files of the kernels that one calls."""
import os

import pytest

numba_config = pytest.importorskip("arraybn.backends.numba_config")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _cache_files(folder):
    return sorted(name for name in os.listdir(os.path.join(folder, "__pycache__"))
                  if name.endswith((".nbi", ".nbc")))


def test_the_cache_is_dropped_when_any_kernel_source_changes_and_kept_otherwise(tmp_path):
    folder = str(tmp_path)
    _write(os.path.join(folder, "numba_gemm.py"), "tile = 1\n")
    _write(os.path.join(folder, "numba_conv.py"), "from numba_gemm import tile\n")
    _write(os.path.join(folder, "other.py"), "x = 1\n")
    os.mkdir(os.path.join(folder, "__pycache__"))

    def cache():
        for name in ("numba_conv.kernel-3.py311.nbi", "numba_conv.kernel-3.py311.1.nbc"):
            _write(os.path.join(folder, "__pycache__", name), "compiled")

    cache()
    assert numba_config.drop_stale_cache(folder)          # no digest yet: not to be trusted
    assert _cache_files(folder) == []
    cache()
    assert not numba_config.drop_stale_cache(folder)      # nothing changed
    assert len(_cache_files(folder)) == 2
    _write(os.path.join(folder, "other.py"), "x = 2\n")   # not a kernel module
    assert not numba_config.drop_stale_cache(folder)
    _write(os.path.join(folder, "numba_gemm.py"), "tile = 2\n")   # a callee, not the caller
    assert numba_config.drop_stale_cache(folder)
    assert _cache_files(folder) == []
    cache()
    assert not numba_config.drop_stale_cache(folder)
    assert len(_cache_files(folder)) == 2


def test_a_cache_folder_that_cannot_be_written_is_left_alone(tmp_path):
    folder = str(tmp_path)
    _write(os.path.join(folder, "numba_gemm.py"), "tile = 1\n")
    _write(os.path.join(folder, "__pycache__"), "a file where the folder would be")
    assert not numba_config.drop_stale_cache(folder)


def test_the_package_keeps_the_digest_of_its_kernel_sources():
    folder = os.path.dirname(os.path.abspath(numba_config.__file__))
    stamp = os.path.join(folder, "__pycache__", numba_config.DIGEST_FILE)
    if not os.access(folder, os.W_OK):
        pytest.skip("a read-only install: Numba caches in its user-wide directory")
    assert os.path.exists(stamp) and not numba_config.drop_stale_cache(folder)
