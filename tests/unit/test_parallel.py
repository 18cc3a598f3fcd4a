"""Data-parallel training (`export.parallel`): two processes that each take half of a batch end
with the full batch's gradient and the same weights; datasets cross to another process without
their frames."""

from __future__ import annotations

import pickle

import numpy as np
import torch
import torch.distributed as dist

from export import data, parallel


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)


def _one_step(shard: parallel.Shard) -> dict:
    model = _model()
    x, y = _batch()
    loss = torch.nn.functional.mse_loss(model(shard.take(x)), shard.take(y))
    loss.backward()
    parallel.average_gradients(model.parameters(), shard)
    grads = [p.grad.clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(shard.world)]
    if shard.world > 1:
        dist.all_gather(everyone, flat)
    else:
        everyone = [flat]
    return {"grads": grads, "weights": everyone}


def test_two_processes_each_on_half_a_batch_step_as_one_process_on_all_of_it():
    one = parallel.run(_one_step, 1)
    two = parallel.run(_one_step, 2)
    for g1, g2 in zip(one["grads"], two["grads"]):
        torch.testing.assert_close(g2, g1, rtol=0, atol=1e-6)
    assert torch.equal(two["weights"][0], two["weights"][1])  # the ranks stay identical
    torch.testing.assert_close(two["weights"][0], one["weights"][0], rtol=0, atol=1e-6)


def test_shards_split_a_batch_without_overlap():
    batch = np.arange(9)
    parts = [parallel.Shard(r, 3).take(batch) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == batch.tolist()
    assert np.array_equal(parallel.SINGLE.take(batch), batch) and parallel.SINGLE.leads


def _describe(ds: data.ClipDataset, scale: int) -> tuple:
    return ds.total_clips * scale, int(ds.clips(1, 0, 1).sum())


def test_concurrent_jobs_return_in_order_and_a_dataset_crosses_without_its_frames(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (40, data.FRAME_SIZE, data.FRAME_SIZE, 3), dtype=np.uint8)
    cache = tmp_path / "frames.u8"
    frames.tofile(cache)
    ds = data.ClipDataset(records=[{}, {}], frames=np.memmap(cache, np.uint8, "r", shape=frames.shape),
                          frame_offset=np.array([0, 16]), num_frames=np.array([16, 24]),
                          clip_offset=np.array([0, 2]), num_clips=np.array([2, 3]), targets={})
    assert len(pickle.dumps(ds)) < 10_000  # the 1.5 MB of frames stay on disk
    assert np.array_equal(pickle.loads(pickle.dumps(ds)).frames, frames)
    jobs = parallel.concurrently([(_describe, (ds, 1)), (_describe, (ds, 10))])
    assert jobs == [(5, int(frames[16:24].sum())), (50, int(frames[16:24].sum()))]


def _train_given(shard: parallel.Shard, model: torch.nn.Module, target: float, steps: int = 3) -> torch.nn.Module:
    """Adam steps on the model it is given, each rank on its share of the batch."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, _ = _batch()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(shard.take(x)), torch.full((len(shard.take(x)), 1), target)).backward()
        parallel.average_gradients(model.parameters(), shard)
        opt.step()
    return model


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_ranks_train_their_own_copy_of_a_model_they_are_given():
    # Handed over through shared memory, both ranks would step one model: every update twice.
    given = _model()
    before = _flat(given).clone()
    alone = _train_given(parallel.SINGLE, _model(), 1.0)
    two = parallel.run(_train_given, 2, given, 1.0)
    torch.testing.assert_close(_flat(two), _flat(alone), rtol=0, atol=1e-6)
    assert torch.equal(_flat(given), before)  # the caller's model is not trained


def test_concurrent_jobs_given_one_model_each_train_their_own_copy():
    given = _model()
    before = _flat(given).clone()
    up, down = parallel.concurrently([(_train_given, (parallel.SINGLE, given, 1.0)),
                                      (_train_given, (parallel.SINGLE, given, -1.0))])
    torch.testing.assert_close(_flat(up), _flat(_train_given(parallel.SINGLE, _model(), 1.0)), rtol=0, atol=1e-6)
    torch.testing.assert_close(_flat(down), _flat(_train_given(parallel.SINGLE, _model(), -1.0)), rtol=0, atol=1e-6)
    assert torch.equal(_flat(given), before)
