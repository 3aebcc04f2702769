"""Sweeps: parsing and validation of the TOML file, resuming, changed specifications, failures."""
import json
import os
import socket

import pytest

from arraybn.experiments.sweep import describe_outcome, plan_sweep, run_sweep
from arraybn.experiments.sweep_config import SweepConfigError, load_sweep, parse_sweep
from tests.stages.helpers import file_sha, quiet
from tests.stages.test_run_lock import lock_holder  # noqa: F401 - a fixture

TINY_TRAIN = """
[train]
data_dir = "{data}"
epochs = 1
batch_size = 16
val_split = 0.25
eval_batch_size = 16
backend = "numpy"
"""


def sweep_toml(data_dir, body, head=""):
    """A sweep file's text: top-level ``head``, tiny shared training options, then ``body``."""
    return head + TINY_TRAIN.format(data=data_dir) + body


def write_sweep(path, data_dir, body, head=""):
    path.write_text(sweep_toml(data_dir, body, head))
    return path


def test_grid_is_the_cartesian_product_with_named_runs(data_dir, tmp_path):
    path = write_sweep(tmp_path / "s.toml", data_dir, """
[grid]
bn = ["none", "full", "mean-only"]
batch_size = [8, 16]
[[runs]]
name = "extra"
bn = "ghost"
""", head='name = "{bn}-bs{batch_size}"\n')
    sweep = load_sweep(path, tmp_path / "runs")
    names = [run.name for run in sweep.runs]
    assert names == ["none-bs8", "none-bs16", "full-bs8", "full-bs16", "mean-only-bs8",
                     "mean-only-bs16", "extra"]
    assert sweep.runs[3].config.batch_size == 16 and sweep.runs[3].config.bn == "full"
    assert sweep.runs[-1].config.bn == "ghost" and sweep.runs[-1].config.epochs == 1
    assert sweep.runs[0].run_dir == os.path.join(str(tmp_path / "runs"), "none-bs8")


def test_tied_grid_options_and_expanded_variants(data_dir):
    data = {"train": {"data_dir": str(data_dir), "backend": "numpy"},
            "grid": {"bn": ["full"],
                     "regularise": [{"augment": False, "dropout": 0.0},
                                    {"augment": True, "dropout": 0.3}]},
            "variants": [{"name": "{postproc.method}-b{postproc.batches}",
                          "postproc": {"method": ["ema", "exact"], "batches": [1, "all"]}},
                         {"name": "batch", "test": {"stats": "batch"}}]}
    runs = parse_sweep(data, "root")
    assert [(r.config.augment, r.config.dropout) for r in runs] == [(False, 0.0), (True, 0.3)]
    variants = runs[0].variants
    assert [v.name for v in variants] == ["ema-b1", "ema-ball", "exact-b1", "exact-ball", "batch"]
    assert variants[1].postproc.batches is None and variants[0].test.stats == "postproc"
    assert variants[-1].postproc is None and variants[-1].test.stats == "batch"


@pytest.mark.parametrize("body, message", [
    ("[grid]\nbn = ['full', 'wat']\n", "bn must be one of"),
    ("[grid]\nbatch_size = [1]\n", "batch_size must be >= 2"),
    ("[grid]\nlearning_rate = [0.1]\n", "learning_rate is not a training option"),
    ("[grid]\nbn = []\n", "must be a non-empty list"),
    ("[postproc]\nmethod = 'median'\n", "unknown postproc method (--method) 'median'"),
    ("[postproc]\nbatches = 0\n", "postproc batches (--batches) must be an integer >= 1"),
    ("[test]\nstats = 'magic'\n", "unknown test stats (--stats) 'magic'"),
    ("[[variants]]\nname = 'v'\ntest = {stats = 'postproc'}\n", "without a postproc table"),
    ("[[variants]]\npostproc = {method = 'exact'}\n", "needs a name"),
    ("[[runs]]\nname = 'a'\n[[runs]]\nname = 'a'\n", "run names repeat: a"),
    ("[[runs]]\nname = 'a/b'\n", "run name 'a/b' must start"),
    ("[[runs]]\nname = 'x'\nepochs = 'three'\n", "epochs must be an integer"),
    ("[[runs]]\nname = 'x'\nbackend = 'fortran'\n", "backend 'fortran'"),
    ("[[runs]]\nname = 'x'\ndata_dir = '/nonexistent'\n", "not found"),
])
def test_bad_files_are_refused_naming_the_problem(data_dir, tmp_path, body, message):
    path = write_sweep(tmp_path / "bad.toml", data_dir, body)
    with pytest.raises(SweepConfigError, match="nothing was run") as info:
        load_sweep(path, tmp_path / "runs")
    assert message in str(info.value)


def test_every_problem_is_listed_and_nothing_is_created(data_dir, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(f'colour = "red"\n[train]\ndata_dir = "{data_dir}"\nepochz = 3\n'
                    '[grid]\nbn = ["wat"]\n')
    with pytest.raises(SweepConfigError) as info:
        load_sweep(path, tmp_path / "runs")
    text = str(info.value)
    assert "unknown key colour" in text and "unknown key epochz" in text and "'wat'" in text
    assert not (tmp_path / "runs").exists()


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\n")
    with pytest.raises(SweepConfigError, match="broken.toml is not valid TOML"):
        load_sweep(path)


@pytest.fixture
def two_runs(data_dir, tmp_path):
    path = write_sweep(tmp_path / "s.toml", data_dir, """
[grid]
bn = ["none", "full"]
[[variants]]
name = "ema-b{postproc.batches}"
postproc = {method = "ema", decay = 0.9, stat = "std", batches = 2, batch_size = 8}
""")
    return path, tmp_path / "runs"


def test_sweep_runs_then_skips_finished_runs(two_runs):
    path, root = two_runs
    sweep = load_sweep(path, root)
    outcomes = run_sweep(sweep, echo=quiet)
    assert [o["status"] for o in outcomes] == ["ok", "ok"]
    full = root / "bnfull"
    assert sorted(os.listdir(root / "bnnone")) == ["sweep-run.json", "sweep.log", "test", "train"]
    assert (full / "postproc" / "bn_stats.npz").is_file()
    variant = full / "variants" / "ema-b2"
    assert os.readlink(variant / "train") == os.path.join("..", "..", "train")
    assert (variant / "postproc").is_dir() and (variant / "test" / "metrics.json").is_file()
    before = {p: os.stat(p).st_mtime_ns for p in (full / "test" / "metrics.json",
                                                   variant / "test" / "metrics.json")}
    assert [s for _, s, _ in plan_sweep(sweep)] == ["done", "done"]
    again = run_sweep(load_sweep(path, root), echo=quiet)
    assert [o["status"] for o in again] == ["skipped", "skipped"]
    assert again[1]["test_accuracy"] == outcomes[1]["test_accuracy"]
    assert before == {p: os.stat(p).st_mtime_ns for p in before}


def test_missing_stage_is_completed_and_new_variant_added(two_runs):
    path, root = two_runs
    run_sweep(load_sweep(path, root), echo=quiet)
    model_sha = file_sha(root / "bnfull", "train", "model.npz")
    os.remove(root / "bnfull" / "test" / "metrics.json")
    path.write_text(path.read_text() + '[[variants]]\nname = "batch"\ntest = {stats = "batch"}\n')
    sweep = load_sweep(path, root)
    status = {spec.name: (s, changes) for spec, s, changes in plan_sweep(sweep)}
    assert status["bnfull"] == ("partial", ["test", "variant batch"])
    run_sweep(sweep, echo=quiet)
    assert (root / "bnfull" / "test" / "metrics.json").is_file()
    assert (root / "bnfull" / "variants" / "batch" / "test" / "metrics.json").is_file()
    assert file_sha(root / "bnfull", "train", "model.npz") == model_sha


def test_changed_specification_is_an_error_unless_forced(two_runs):
    path, root = two_runs
    run_sweep(load_sweep(path, root), echo=quiet)
    model_sha = file_sha(root / "bnfull", "train", "model.npz")
    path.write_text(path.read_text() + "[test]\nstats = 'running'\n")
    with pytest.raises(SweepConfigError, match=r"bnfull: test"):
        run_sweep(load_sweep(path, root), echo=quiet)
    run_sweep(load_sweep(path, root), force=True, echo=quiet)
    assert file_sha(root / "bnfull", "train", "model.npz") == model_sha  # not retrained
    assert '"stats": "running"' in (root / "bnfull" / "test" / "metrics.json").read_text()
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 2"))
    with pytest.raises(SweepConfigError, match="train.epochs"):
        plan_sweep(load_sweep(path, root))
    run_sweep(load_sweep(path, root), force=True, echo=quiet)
    assert file_sha(root / "bnfull", "train", "model.npz") != model_sha


def test_a_failing_run_is_reported_and_the_others_finish(data_dir, tmp_path):
    # 30 test images in batches of 29 leave a batch of one: no batch statistics at test time
    path = write_sweep(tmp_path / "s.toml", data_dir, """
[test]
stats = "batch"
[[runs]]
name = "fails"
bn = "full"
eval_batch_size = 29
[[runs]]
name = "works"
bn = "full"
""")
    outcomes = run_sweep(load_sweep(path, tmp_path / "runs"), echo=quiet)
    assert [o["status"] for o in outcomes] == ["failed", "ok"]
    assert "StageError" in outcomes[0]["error"]
    log = (tmp_path / "runs" / "fails" / "sweep.log").read_text()
    assert "FAILED: StageError: " in log and "Traceback" not in log     # a user error: one line
    assert (tmp_path / "runs" / "works" / "test" / "metrics.json").is_file()


def test_init_in_a_grid_and_a_record_made_before_the_option(data_dir, tmp_path):
    path = write_sweep(tmp_path / "s.toml", data_dir, "[grid]\nbn = ['none']\n"
                       "init = ['kaiming-uniform', 'kaiming-normal']\n", head='name = "{init}"\n')
    sweep = load_sweep(path, tmp_path / "runs")
    assert [o["status"] for o in run_sweep(sweep, echo=quiet)] == ["ok", "ok"]
    for name in ("kaiming-uniform", "kaiming-normal"):
        manifest = json.loads((tmp_path / "runs" / name / "train" / "manifest.json").read_text())
        assert manifest["config"]["init"] == name
    record_path = tmp_path / "runs" / "kaiming-uniform" / "sweep-run.json"
    record = json.loads(record_path.read_text())
    del record["train"]["init"]                        # as written before the option existed
    record_path.write_text(json.dumps(record))
    assert [status for _, status, _ in plan_sweep(sweep)] == ["done", "done"]


def test_a_run_locked_by_a_live_process_is_skipped_not_failed(data_dir, tmp_path, lock_holder):
    path = write_sweep(tmp_path / "s.toml", data_dir, "[[runs]]\nname = 'busy'\nbn = 'none'\n"
                                                      "[[runs]]\nname = 'free'\nbn = 'none'\n")
    busy = tmp_path / "runs" / "busy"
    holder = lock_holder(busy)
    outcomes = run_sweep(load_sweep(path, tmp_path / "runs"), echo=quiet)
    assert [o["status"] for o in outcomes] == ["running elsewhere", "ok"]
    who = f"pid {holder.pid} on {socket.gethostname()}"
    assert outcomes[0]["holder"] == who
    assert describe_outcome(outcomes[0]) == f"busy: skipped (running elsewhere: {who})"
    log = (busy / "sweep.log").read_text()
    assert f"skipped (running elsewhere: {who})" in log and "FAILED" not in log
    assert sorted(os.listdir(busy)) == [".lock", "sweep.log"]         # nothing else touched


def test_a_diverged_run_is_a_result_and_is_not_trained_again(data_dir, tmp_path):
    path = write_sweep(tmp_path / "s.toml", data_dir,
                       "[[runs]]\nname = 'explodes'\nbn = 'none'\noptimizer = 'adam'\nlr = 1e6\n"
                       "[[runs]]\nname = 'trains'\nbn = 'none'\n")
    root = tmp_path / "runs"
    outcomes = run_sweep(load_sweep(path, root), echo=quiet)
    assert [o["status"] for o in outcomes] == ["diverged", "ok"]
    assert outcomes[0]["error"].startswith("training diverged at epoch 1, step ")
    log = (root / "explodes" / "sweep.log").read_text()
    assert "DIVERGED: TrainingDiverged: training diverged at epoch 1" in log and "FAILED" not in log
    record = root / "explodes" / "train-checkpoint" / "diverged.json"
    written = record.stat().st_mtime_ns
    sweep = load_sweep(path, root)
    assert [status for _, status, _ in plan_sweep(sweep)] == ["diverged", "done"]
    messages = []
    again = run_sweep(sweep, echo=messages.append)
    assert [o["status"] for o in again] == ["diverged", "skipped"]
    assert again[0]["error"] == outcomes[0]["error"] and record.stat().st_mtime_ns == written
    assert "1 of 2 runs diverged before: not run again" in messages[1]
    path.write_text(path.read_text().replace("lr = 1e6", "lr = 1e-3"))
    retrained = run_sweep(load_sweep(path, root), force=True, echo=quiet)
    assert retrained[0]["status"] == "ok" and not record.exists()


def test_a_sweep_worker_shares_the_cores_with_the_convolutions_chunks_too():
    """limit_threads (each of a sweep's jobs workers): numba's threads and the convolutions'
    chunk threads alike."""
    from arraybn.experiments.process_pool import limit_threads
    from arraybn.nn import chunk_threads
    before = chunk_threads.threads()
    try:
        limit_threads(1)
        assert chunk_threads.threads() == 1
        limit_threads(3)
        assert chunk_threads.threads() == 3
    finally:
        chunk_threads.set_threads(before)
