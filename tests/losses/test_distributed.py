"""Under torch.distributed (2 gloo processes on CPU) every rank holds the same buffers, equal to one
process fed the same global batches."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_srn.data import pack_target
from timm_srn.losses import SpatialConsistencyLoss

C, N, STEPS, BATCH = 4, 12, 3, 3


def _global_batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        index = torch.randint(0, N, (2 * BATCH,), generator=g)  # duplicates across ranks happen
        x0y0 = torch.rand(2 * BATCH, 2, generator=g) * 0.4
        boxes = torch.cat([x0y0, x0y0 + 0.5], 1)
        flips = torch.rand(2 * BATCH, generator=g) < 0.5
        targets = torch.stack([pack_target(torch.eye(C)[i % C], int(i), b.tolist(), bool(f))
                               for i, b, f in zip(index, boxes, flips)])
        logits = torch.randn(2 * BATCH, C, generator=g)
        maps = torch.randn(2 * BATCH, C, 3, 3, generator=g)
        batches.append((logits, targets, maps))
    return batches


class _Maps:
    maps = None
    def latest(self):
        return self.maps
    def remove(self):
        pass


def _criterion():
    criterion = SpatialConsistencyLoss(N, C, warmup_epochs=0, heatmap_size=(4, 4), heatmap_dtype=torch.float32)
    criterion._source = _Maps()
    return criterion


def _run(criterion, batches, rows):
    for logits, targets, maps in batches:
        criterion._source.maps = maps[rows]
        criterion(logits[rows], targets[rows])
    return criterion


def _worker(rank, init_file, result_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    criterion = _run(_criterion(), _global_batches(), slice(rank * BATCH, (rank + 1) * BATCH))
    torch.save(criterion.state_dict(), f'{result_file}.{rank}')
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_identical_buffers_equal_to_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'state')), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f'state.{r}') for r in (0, 1))
    single = _run(_criterion(), _global_batches(), slice(None)).state_dict()
    for key in single:
        if key == 'samples_seen':
            continue
        assert torch.equal(rank0[key], rank1[key]), key
        # the same arithmetic up to 1 ulp: vectorised sigmoid rounds batches of 3 and 6 rows differently
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=1e-6, msg=key)
    assert rank0['heatmaps.seen'].any()
    assert int(rank0['samples_seen']) == int(single['samples_seen']) == STEPS * 2 * BATCH
