"""The step sampler alone: what each process gets of every global batch, and the weights that make a
step the mean over all the window's images on any number of processes."""

from collections import Counter

import pytest

from finetune.train.data_loader import CLASS, INSTANCE, StepSampler

# Three buckets of 5, 3 and 1 images: remainders, a bucket smaller than a process count.
BUCKETS = [0] * 5 + [1] * 3 + [2]


def _windows(sampler: StepSampler):
    """Per window: for each global batch, the slices of processes 0..n-1."""
    slices = list(sampler)
    per_batch = [slices[k:k + sampler.processes] for k in range(0, len(slices), sampler.processes)]
    return per_batch


@pytest.mark.parametrize("processes,batch,accumulation", [(1, 2, 1), (2, 1, 1), (2, 2, 3), (4, 1, 2), (3, 2, 1)])
def test_every_image_once_an_epoch_one_bucket_per_global_batch(processes, batch, accumulation):
    s = StepSampler(BUCKETS, None, batch, processes, accumulation, seed=7)
    s.start_at(epoch=2)
    batches = _windows(s)
    assert len(batches) == s.global_batches
    real = Counter()
    for slices in batches:
        assert all(len(sl) <= batch for sl in slices) and all(sl for sl in slices)  # nobody waits empty-handed
        draws = [d for sl in slices for d in sl if d.weight > 0]
        assert len({BUCKETS[d.index] for sl in slices for d in sl}) == 1
        real.update(d.index for d in draws)
        assert all(d.epoch == 2 and d.source == INSTANCE for sl in slices for d in sl)
    assert real == Counter(range(len(BUCKETS)))


@pytest.mark.parametrize("processes,batch,accumulation", [(1, 2, 2), (2, 1, 2), (4, 1, 1), (3, 2, 3)])
def test_weights_make_each_step_the_mean_over_its_images(processes, batch, accumulation):
    s = StepSampler(BUCKETS, None, batch, processes, accumulation, seed=0)
    batches = _windows(s)
    for start in range(0, len(batches), accumulation):
        window = [d for slices in batches[start:start + accumulation] for sl in slices for d in sl]
        real = [d for d in window if d.weight > 0]
        # accelerate divides by the accumulation steps, DDP averages over processes: what remains is the mean.
        assert sum(d.weight for d in window) / (accumulation * processes) == pytest.approx(1.0)
        assert len({d.weight for d in real}) == 1
    assert s.steps_per_epoch == -(-len(batches) // accumulation)


def test_same_global_batches_on_any_number_of_processes():
    """2 processes x batch 1 see the global batches 1 process x batch 2 sees, in the same order."""
    one = [[d.index for d in sl] for sl in StepSampler(BUCKETS, None, 2, 1, 1, seed=3)]
    two = list(StepSampler(BUCKETS, None, 1, 2, 1, seed=3))
    paired = [[d.index for d in a + b if d.weight > 0] for a, b in zip(two[::2], two[1::2])]
    assert paired == one


def test_class_images_pair_with_instance_batches_and_cycle_their_own_epochs():
    s = StepSampler(BUCKETS, [0, 0, 0], 2, 2, 1, seed=1)
    seen = Counter()
    for epoch in range(3):
        s.start_at(epoch)
        for sl in s:
            classes = [d for d in sl if d.source == CLASS]
            assert classes
            seen.update((d.index, d.epoch) for d in classes if d.weight > 0)
    # Every class image once per class epoch, class epochs counted apart from the instance epochs.
    per_epoch = Counter(e for (_, e) in seen)
    assert all(n == 3 for e, n in per_epoch.items() if e < max(per_epoch))


def test_a_resumed_epoch_skips_whole_windows():
    s = StepSampler(BUCKETS, None, 1, 2, 2, seed=5)
    s.start_at(1)
    full = list(s)
    s.start_at(1, skip=2)
    assert list(s) == full[2 * 2:]
    assert len(s) == len(full) - 4
    s.set_epoch(1)  # what accelerate calls on a single process must keep the position
    assert len(s) == len(full) - 4
