"""The communicator contract on the in-process thread ranks, and world()'s MPI detection."""
import subprocess
import sys
import threading

import numpy as np
import pytest

from arraybn.distributed import (ThreadCommunicator, ThreadGroup, check_group_size,
                                 launched_size, run_ranks, world)


def test_ranks_know_their_rank_and_size():
    assert run_ranks(3, lambda comm: (comm.rank, comm.size)) == [(0, 3), (1, 3), (2, 3)]


def test_allgather_stacks_every_rank_in_rank_order():
    gathered = run_ranks(3, lambda comm: comm.allgather(np.full((2, 2), float(comm.rank))))
    for result in gathered:
        assert result.shape == (3, 2, 2)
        np.testing.assert_array_equal(result[:, 0, 0], [0.0, 1.0, 2.0])


def test_allreduce_sum_adds_in_rank_order_and_is_the_same_on_every_rank():
    # (1e16 + 1) - 1e16 is 0 in float64, while 1e16 - 1e16 + 1 is 1: only rank order gives 0.
    values = [1e16, 1.0, -1e16]
    results = run_ranks(3, lambda comm: comm.allreduce_sum(np.array([values[comm.rank], 2.0])))
    for result in results:
        np.testing.assert_array_equal(result, [0.0, 6.0])


def test_allreduce_sum_keeps_the_shape_of_stacked_vectors():
    results = run_ranks(2, lambda comm: comm.allreduce_sum(np.ones((2, 5))))
    np.testing.assert_array_equal(results[1], np.full((2, 5), 2.0))


@pytest.mark.parametrize("bad", [np.ones(3, dtype=np.float32), [1.0, 2.0]])
def test_allreduce_sum_refuses_anything_but_host_float64(bad):
    with pytest.raises(TypeError, match="host .NumPy. float64 array"):
        run_ranks(2, lambda comm: comm.allreduce_sum(bad))


def test_split_gives_groups_of_consecutive_ranks():
    def member(comm):
        sub = comm.split(2)
        return sub.rank, sub.size, sub.allreduce_sum(np.array([float(comm.rank)]))[0]
    assert run_ranks(4, member) == [(0, 2, 1.0), (1, 2, 1.0), (0, 2, 5.0), (1, 2, 5.0)]


def test_split_into_the_whole_group_is_the_group_itself():
    assert run_ranks(2, lambda comm: comm.split(2) is comm) == [True, True]


@pytest.mark.parametrize("group_size, message", [
    (3, "does not divide the 4 processes.*choose one of 1, 2, 4"),
    (0, "positive integer"), (1.5, "positive integer")])
def test_split_refuses_a_size_that_does_not_divide_the_group(group_size, message):
    with pytest.raises(ValueError, match=message):
        check_group_size(group_size, 4)


def test_a_raising_rank_releases_the_others_and_its_error_is_raised():
    def member(comm):
        if comm.rank == 1:
            raise ArithmeticError("rank 1 failed on purpose")
        comm.allreduce_sum(np.zeros(1))          # would wait forever for rank 1
    with pytest.raises(ArithmeticError, match="rank 1 failed on purpose"):
        run_ranks(3, member)


def test_a_lost_rank_breaks_the_barrier_after_the_timeout():
    group = ThreadGroup(2, timeout=0.05)
    with pytest.raises(threading.BrokenBarrierError):
        ThreadCommunicator(group, 0).barrier()


@pytest.mark.parametrize("environ, size", [
    ({}, 1), ({"OMPI_COMM_WORLD_SIZE": "4"}, 4), ({"PMI_SIZE": "2"}, 2),
    ({"SLURM_STEP_NUM_TASKS": "8"}, 8), ({"PMIX_RANK": "0"}, None),
    ({"SLURM_NTASKS": "8"}, 1)])        # sbatch sets it for the batch script: not an MPI world
def test_launched_size_reads_the_launchers_variables(environ, size):
    assert launched_size(environ) == size


def test_world_is_none_without_a_launcher_and_never_imports_mpi4py():
    code = ("import sys, arraybn, arraybn.distributed as d; "
            "assert d.world({}) is None; assert d.world({'OMPI_COMM_WORLD_SIZE': '1'}) is None; "
            "print('mpi4py' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_a_missing_mpi4py_says_how_to_install_it():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from arraybn.distributed import MPICommunicator\n"
            "try:\n    MPICommunicator()\nexcept ImportError as exc:\n    print(exc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "pip install -e '.[mpi]'" in done.stdout


def test_world_under_a_launcher_without_mpi4py_says_how_to_install_it():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from arraybn.distributed import world\n"
            "try:\n    world({'OMPI_COMM_WORLD_SIZE': '2'})\nexcept ImportError as exc:\n"
            "    print(exc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "mpi4py" in done.stdout and ".[mpi]" in done.stdout
