"""Masked statistics over the global batch (`all_reduce`): data-parallel ranks, each holding a shard of the rows,
get what one process gets on the concatenation -- the whitening PPO's ranks apply to their advantages. The ranks
are simulated by threads whose `all_reduce` is a real collective (a barrier; the sum in rank order)."""
from __future__ import annotations

import threading

import pytest
import torch

from alignment.algos import masked_count, masked_mean, masked_var, masked_whiten


class ThreadRanks:
    """`world` threads acting as data-parallel ranks; `all_reduce` sums a tensor over them (every rank waits)."""

    def __init__(self, world: int):
        self.world, self.barrier, self.local = world, threading.Barrier(world, timeout=10), threading.local()
        self.slots: list = [None] * world

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())  # the same order, so the same bits, on every rank
        self.barrier.wait()
        return total

    def run(self, fn, shards: list) -> list:
        """fn(shard, all_reduce) on each rank's shard at once; results (or exceptions) in rank order."""
        results: list = [None] * self.world

        def work(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(shards[rank], self.all_reduce)
            except Exception as err:  # noqa: BLE001 -- returned to the test, which checks every rank raised
                results[rank] = err

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def rollout(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) values and a prefix mask of random lengths 0..T (an empty row included)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, length, generator=gen) * 3 + 1
    lengths = torch.randint(0, length + 1, (rows,), generator=gen)
    lengths[0] = 0
    return x, torch.arange(length) < lengths[:, None]


# shards of unequal size, one rank with no valid token at all, values at pads set to 1e6 (must not count)
SPLITS = [(2, 4), (1, 1, 4), (6,)]


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("unbiased,shift_mean", [(True, True), (False, True), (True, False)])
def test_whitening_shards_equals_whitening_the_concatenation(split, unbiased, shift_mean):
    x, mask = rollout(6, 5, seed=0)
    x = torch.where(mask, x, 1e6)
    if split == (1, 1, 4):
        mask[:2] = False  # ranks 0 and 1: nothing valid
    bounds = torch.tensor((0,) + split).cumsum(0).tolist()
    shards = [(x[a:b], mask[a:b]) for a, b in zip(bounds, bounds[1:])]

    expected = masked_whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased)
    ranks = ThreadRanks(len(split))
    got = ranks.run(lambda s, reduce: masked_whiten(*s, shift_mean=shift_mean, unbiased=unbiased, all_reduce=reduce),
                    shards)
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-6, atol=1e-6)

    stats = ranks.run(lambda s, reduce: (masked_mean(*s, all_reduce=reduce), masked_var(*s, unbiased, all_reduce=reduce),
                                         masked_count(s[1], all_reduce=reduce)), shards)
    for mean, var, count in stats:  # every rank holds the global numbers
        torch.testing.assert_close(mean, masked_mean(x, mask), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, masked_var(x, mask, unbiased), rtol=1e-6, atol=1e-6)
        assert count == int(mask.sum())


def test_hand_computed_global_whitening():
    """Checklist (a) 5 split over two ranks: x = [1, 2 | 3, 100], mask [1, 1 | 1, 0] -> [-1, 0 | 1, 0] (unbiased)."""
    shards = [(torch.tensor([[1.0, 2.0]]), torch.tensor([[True, True]])),
              (torch.tensor([[3.0, 100.0]]), torch.tensor([[True, False]]))]
    got = ThreadRanks(2).run(lambda s, reduce: masked_whiten(*s, all_reduce=reduce, eps=0.0), shards)
    assert torch.cat(got).flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)


def test_too_few_valid_positions_over_all_ranks_raises_on_every_rank():
    """One valid token in the global batch: every rank raises (none is left waiting in a collective)."""
    shards = [(torch.ones(1, 3), torch.tensor([[True, False, False]])), (torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool))]
    errors = ThreadRanks(2).run(lambda s, reduce: masked_whiten(*s, all_reduce=reduce), shards)
    assert all(isinstance(e, ValueError) and "got 1" in str(e) for e in errors), errors


def test_all_reduce_needs_every_dim():
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(torch.ones(2, 2), torch.ones(2, 2), dim=1, all_reduce=lambda t: t)
