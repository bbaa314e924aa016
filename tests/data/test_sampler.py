"""StatefulSampler: disjoint ranks, determinism, exact resume, wrap-around, epoch accounting."""

import itertools

import pytest

from synthunlearn.data import StatefulSampler
from synthunlearn.errors import ConfigError


def samplers(n, mbs, world, seed=0):
    return [StatefulSampler(n, micro_batch_size=mbs, rank=r, world_size=world, seed=seed)
            for r in range(world)]


def take(sampler, steps):
    return [next(sampler) for _ in range(steps)]


def test_ranks_disjoint_within_an_epoch_and_cover_it():
    n, mbs, world = 24, 3, 4  # 2 micro-steps per epoch
    ss = samplers(n, mbs, world)
    drawn = [list(itertools.chain.from_iterable(take(s, 2))) for s in ss]
    everything = sorted(itertools.chain.from_iterable(drawn))
    assert everything == list(range(n))  # each example exactly once, no rank overlap
    assert all(s.epoch == 1.0 for s in ss)
    # The next epoch is a different permutation.
    assert ss[0].permutation(1) != ss[0].permutation(0)
    assert sorted(ss[0].permutation(1)) == list(range(n))


def test_deterministic_from_seed():
    a, b = samplers(50, 4, 2, seed=7), samplers(50, 4, 2, seed=7)
    assert take(a[1], 20) == take(b[1], 20)
    c = samplers(50, 4, 2, seed=8)
    assert take(a[0], 5) != take(c[0], 5)


def test_state_dict_round_trip_continues_identically():
    ref = samplers(37, 3, 2, seed=3)[1]
    run = samplers(37, 3, 2, seed=3)[1]
    take(run, 9)  # mid-epoch (54 of 37*2 positions)
    state = run.state_dict()
    expected = take(run, 30)
    resumed = samplers(37, 3, 2, seed=3)[1]
    resumed.load_state_dict(state)
    assert resumed.epoch == pytest.approx(state["epoch"] + state["offset"] / 37)
    assert take(resumed, 30) == expected
    take(ref, 9)
    assert take(ref, 30) == expected
    with pytest.raises(ConfigError, match="num_examples=37, seed=3"):
        samplers(36, 3, 2, seed=3)[0].load_state_dict(state)


def test_partial_global_batch_wraps_in_lock_step():
    n, mbs, world = 10, 2, 2  # 4 per step: the third step takes 2 from epoch 0 and 2 from epoch 1
    ss = samplers(n, mbs, world)
    steps = [[next(s) for s in ss] for _ in range(5)]  # 20 positions = exactly 2 epochs
    stream = [i for step in steps for mb in step for i in mb]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert all(len(mb) == mbs for step in steps for mb in step)
    assert ss[0].epoch == ss[1].epoch == 2.0


def test_tiny_dataset_smaller_than_global_batch():
    ss = samplers(3, 4, 2)  # 8 per step from 3 examples
    first = [next(s) for s in ss]
    assert all(len(mb) == 4 for mb in first)
    assert ss[0].epoch == pytest.approx(8 / 3)
    flat = first[0] + first[1]
    assert sorted(flat[:3]) == sorted(flat[3:6]) == [0, 1, 2]
    assert take(ss[0], 100)  # keeps going


def test_world_size_change_keeps_the_per_step_sets():
    # Same global batch (8): 1 rank x 8 vs 4 ranks x 2.
    one = samplers(30, 8, 1)[0]
    four = samplers(30, 2, 4)
    for _ in range(6):
        assert sorted(next(one)) == sorted(i for s in four for i in next(s))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        StatefulSampler(0, micro_batch_size=1, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError):
        StatefulSampler(5, micro_batch_size=1, rank=2, world_size=2, seed=0)
