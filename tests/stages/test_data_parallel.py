"""Data-parallel training in one process: K threads (``run_ranks``) train the model that one
process trains (float64), with every ``--bn-sync`` mode, dropout, augmentation, uneven and empty
slices; the interrupt flag is agreed on by every rank. The real ``mpiexec`` runs are in
``tests/distributed/test_mpi_training.py``."""
import numpy as np
import pytest

import arraybn
from arraybn.data import Split
from arraybn.distributed import run_ranks
from arraybn.errors import ConfigError
from arraybn.stages.common import make_model
from arraybn.stages.config import TrainConfig
from arraybn.stages.parallel import DataParallel, shard_bounds
from arraybn.stages.training_loop import Trainer

RTOL = 1e-9


def _splits(n_train=66, n_val=10, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n) % 10
        images = rng.normal(size=(n, 1, 12, 12)) + labels[:, None, None, None] / 5
        return Split(images.astype(np.float32), labels.astype(np.int64))
    return {"train": split(n_train), "val": split(n_val)}


def _config(**changes):
    options = dict(model="lenet5", dtype="float64", epochs=1, batch_size=32, backend="numpy",
                   optimizer="sgd", lr=0.1, schedule="constant", eval_batch_size=8)
    options.update(changes)
    return TrainConfig(**options)


def _train(config, splits, comm=None, stop_on_rank=None):
    if config.train_subset:
        splits = dict(splits, train=Split(*(a[:config.train_subset] for a in
                                             (splits["train"].images, splits["train"].labels))))
    model = make_model(config, (12, 12), arraybn.get_backend(config.backend))
    trainer = Trainer(model, config, splits, fill=0.0)
    if comm is not None:
        trainer.parallel = DataParallel(comm, model, config.bn_sync)
        if stop_on_rank is not None:
            _stop_after_first_step(trainer, comm.rank == stop_on_rank)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return {"stopped_at": (trainer.epoch, trainer.step)}
    return {"state": model.state_dict(), "history": trainer.history}


def _stop_after_first_step(trainer, on_this_rank):
    step = trainer.parallel.reduce_step

    def reduce_step(model, loss_sum, correct, count, interrupt):
        return step(model, loss_sum, correct, count, interrupt or on_this_rank)
    trainer.parallel.reduce_step = reduce_step


def _assert_same_state(got, want, keys=None, lr=0.1):
    """Equal to RTOL. The ranks add the same terms in another order (each rank's slice, then
    the all-reduce), so values differ by rounding relative to the terms added: for a weight,
    the updates of size ~lr (Adam's are ~lr whatever the gradient), hence atol = RTOL * lr,
    not relative to a weight that the updates happen to bring near zero."""
    for key in keys or want:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=RTOL * lr, err_msg=key)


def _assert_same_history(got, want):
    for row_got, row_want in zip(got, want, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert row_got[key] == pytest.approx(row_want[key], rel=RTOL), key


@pytest.mark.parametrize("ranks, changes", [
    (2, dict(model="mlp", hidden=(32, 16))),
    (3, dict(batch_size=32, dropout=0.3, augment=True)),        # 11/11/10 rows per rank
    # rank 2's slice is empty; 6 steps: batch-2 BN amplifies rounding ~10x per step
    (3, dict(batch_size=2, model="mlp", hidden=(16,), train_subset=12)),
    (2, dict(optimizer="adam", bn="mean-only", weight_decay=1e-3)),
    (2, dict(bn="renorm", stats="running")),
    (3, dict(augment=True, augment_crop=2)),                     # 11/11/10 rows per rank
    (2, dict(augment_crop=1)),
    (2, dict(model="resnet", depth=8, width=2)),
    (2, dict(model="plain", depth=4, width=2, bn="group", augment_crop=1)),
    (3, dict(augment=True, augment_crop=2, backend="numba")),    # the one-pass kernel
], ids=["mlp K=2", "lenet uneven dropout augment K=3", "empty slice K=3", "adam mean-only",
        "renorm", "affine+crop K=3", "crop only K=2", "resnet8 K=2", "plain group K=2",
        "numba affine+crop K=3"])
def test_threads_train_the_one_process_model(ranks, changes):
    config, splits = _config(**changes), _splits()
    want = _train(config, splits)
    results = run_ranks(ranks, lambda comm: _train(config, splits, comm))
    for result in results:
        _assert_same_state(result["state"], want["state"], lr=config.lr)
        _assert_same_history(result["history"], want["history"])
        for key in want["state"]:          # bit-identical on every rank
            np.testing.assert_array_equal(result["state"][key], results[0]["state"][key])


def test_bn_sync_local_trains_the_ghost_batch_model():
    splits = _splits()
    want = _train(_config(bn="ghost", ghost_batch_size=16), splits)
    config = _config(bn_sync="local")
    results = run_ranks(2, lambda comm: _train(config, splits, comm))
    weights = [k for k in want["state"] if "running" not in k and "tracked" not in k]
    for result in results:
        _assert_same_state(result["state"], want["state"], weights, lr=config.lr)


def test_bn_sync_local_running_buffers_are_the_count_weighted_average_over_ranks():
    splits = _splits(n_train=32)
    config = _config(bn_sync="local", model="mlp", hidden=(8,), lr=1e-9)

    def first_step_buffers(comm):
        model = make_model(config, (12, 12), arraybn.get_backend("numpy"))
        trainer = Trainer(model, config, splits, fill=0.0)
        trainer.parallel = DataParallel(comm, model, "local")
        index = np.arange(32)
        rows = trainer.parallel.rows(index)
        trainer._train_step(splits["train"], index, False)
        x = model.layers[0].forward(splits["train"].images[rows].astype(np.float64), True)
        x = model.layers[1].forward(x, True)                 # fc1 output this rank saw
        return x, model.bn_layers()[0][1].running_mean.copy()
    results = run_ranks(2, first_step_buffers)
    # every rank: 0.9 * 0 + 0.1 * (mean of rank 0's 16 rows + mean of rank 1's 16 rows) / 2
    expected = 0.1 * (results[0][0].mean(axis=0) + results[1][0].mean(axis=0)) / 2
    for _, running_mean in results:
        np.testing.assert_allclose(running_mean, expected, rtol=1e-6)


def test_bn_sync_groups_of_two_over_four_ranks_keep_identical_buffers():
    config, splits = _config(bn_sync="2", model="mlp", hidden=(16,)), _splits()
    results = run_ranks(4, lambda comm: _train(config, splits, comm))
    for result in results[1:]:
        for key, value in results[0]["state"].items():
            np.testing.assert_array_equal(result["state"][key], value, err_msg=key)


def test_an_interrupt_on_one_rank_stops_every_rank_at_the_same_step():
    config, splits = _config(batch_size=8, model="mlp", hidden=(8,)), _splits()
    results = run_ranks(3, lambda comm: _train(config, splits, comm, stop_on_rank=2))
    assert [r["stopped_at"] for r in results] == [(0, 1)] * 3


@pytest.mark.parametrize("changes, message", [
    (dict(bn="ghost"), "use --bn-sync local"),
    (dict(bn_sync="3"), "group size 3 does not divide the 2 processes"),
])
def test_unusable_bn_sync_is_a_config_error(changes, message):
    config = _config(**changes)

    def build(comm):
        model = make_model(config, (12, 12), arraybn.get_backend("numpy"))
        DataParallel(comm, model, config.bn_sync)
    with pytest.raises(ConfigError, match=message):
        run_ranks(2, build)


def test_bn_sync_must_be_all_local_or_a_group_size():
    with pytest.raises(ConfigError, match="'all'.*'local'.*group size"):
        _config(bn_sync="some")


@pytest.mark.parametrize("n, size", [(64, 3), (2, 3), (10, 2), (0, 2), (7, 7)])
def test_shards_are_cut_as_numpy_array_split(n, size):
    parts = np.array_split(np.arange(n), size)
    for rank, part in enumerate(parts):
        start, stop = shard_bounds(n, size, rank)
        np.testing.assert_array_equal(np.arange(n)[start:stop], part)


def test_a_random_crop_alone_transforms_the_training_batches():
    splits = _splits()
    cropped = _train(_config(augment_crop=1), splits)["state"]
    plain = _train(_config(), splits)["state"]
    assert not np.allclose(cropped["conv1.weight"], plain["conv1.weight"])
