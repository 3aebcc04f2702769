"""Data-parallel training (thread ranks) of the deep models and with random crops gives the
one-process model, as for LeNet-5 (see test_data_parallel)."""
import numpy as np
import pytest

from arraybn.distributed import run_ranks
from tests.stages.test_data_parallel import (_assert_same_history, _assert_same_state, _config,
                                             _splits, _train)


@pytest.mark.parametrize("ranks, changes", [
    (3, dict(augment=True, augment_crop=2)),                     # 11/11/10 rows per rank
    (2, dict(augment_crop=1)),
    (2, dict(model="resnet", depth=8, width=2)),
    (2, dict(model="plain", depth=4, width=2, bn="group", augment_crop=1)),
], ids=["affine+crop K=3", "crop only K=2", "resnet8 K=2", "plain group K=2"])
def test_threads_train_the_one_process_model(ranks, changes):
    config, splits = _config(**changes), _splits()
    want = _train(config, splits)
    results = run_ranks(ranks, lambda comm: _train(config, splits, comm))
    for result in results:
        _assert_same_state(result["state"], want["state"])
        _assert_same_history(result["history"], want["history"])
        for key in want["state"]:
            np.testing.assert_array_equal(result["state"][key], results[0]["state"][key])


def test_a_random_crop_alone_transforms_the_training_batches():
    splits = _splits()
    cropped = _train(_config(augment_crop=1), splits)["state"]
    plain = _train(_config(), splits)["state"]
    assert not np.allclose(cropped["conv1.weight"], plain["conv1.weight"])
