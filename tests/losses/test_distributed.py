"""Under torch.distributed (2 gloo processes on CPU) every rank holds the same per-sample state (the buffers, ROLE's
estimates, LL-Cp's flips), equal to one process fed the same global batches."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_srn.data import pack_target
from timm_srn.distributed import all_gather_rows
from timm_srn.losses import SpatialConsistencyLoss, create_single_positive_loss

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


def _role_and_large_loss_batches():
    """Per step: logits and packed targets of a global batch of 2 x BATCH distinct samples (rows 0..BATCH-1 are rank
    0's, the rest rank 1's)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        index = torch.randperm(N, generator=g)[:2 * BATCH]
        targets = torch.stack([pack_target(torch.eye(C)[i % C], int(i)) for i in index])
        batches.append((torch.randn(2 * BATCH, C, generator=g) * 3, targets))
    return batches


def _role(seed):
    torch.manual_seed(seed)  # train.py seeds every rank differently: the estimates start apart
    role = create_single_positive_loss('role', N, C)
    return role, torch.optim.SGD(role.parameters(), lr=1.)


def _step_role(role, optimizer, logits, targets):
    optimizer.zero_grad()
    role(logits, targets).backward()
    optimizer.step()


def _large_loss():
    large_loss = create_single_positive_loss('ll-cp', N, C, delta_rel=40.)
    large_loss.set_epoch(1)
    return large_loss


HALVES = torch.tensor([[float('nan'), -0.], [65504., 1e-7]], dtype=torch.float16)


def _baselines_worker(rank, init_file, result_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    role, optimizer = _role(seed=rank)
    large_loss = _large_loss()
    for logits, targets in _role_and_large_loss_batches():
        _step_role(role, optimizer, logits[rows], targets[rows])
        large_loss(logits[rows], targets[rows])
    # rows of several dtypes, 2 rows on rank 0 and none on rank 1; an index beyond float64's exact integers
    index = torch.tensor([2 ** 60 + 1, 7])[:2 - 2 * rank]
    flags = torch.tensor([[True, False], [False, True]])[:2 - 2 * rank]
    halves = HALVES[:2 - 2 * rank]
    gathered = all_gather_rows(index, flags, halves)
    torch.save(dict(role=role.state_dict(), large_loss=large_loss.state_dict(), gathered=gathered),
               f'{result_file}.{rank}')
    dist.destroy_process_group()


def test_two_gloo_ranks_share_role_estimates_and_ll_cp_flips_as_one_process(tmp_path):
    """ROLE's label estimates and LL-Cp's permanent flips are per-sample state as the buffers are: every rank ends
    with rank 0's random start trained on both ranks' rows, as one process on the global batches; LL-Cp holds the
    flips of both ranks' rows. `all_gather_rows` keeps dtypes bit for bit, with row counts that differ."""
    mp.spawn(_baselines_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'state')), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f'state.{r}') for r in (0, 1))
    role, optimizer = _role(seed=0)
    large_loss = _large_loss()
    for logits, targets in _role_and_large_loss_batches():
        _step_role(role, optimizer, logits, targets)
        for half in (slice(0, BATCH), slice(BATCH, None)):  # distinct samples: the order of the halves is moot
            large_loss(logits[half], targets[half])
    for name, single in (('role', role.state_dict()), ('large_loss', large_loss.state_dict())):
        for key, value in single.items():
            assert torch.equal(rank0[name][key], rank1[name][key]), (name, key)
            torch.testing.assert_close(rank0[name][key], value, rtol=0, atol=1e-6, msg=f'{name}.{key}')
    assert rank0['role']['initialised'].sum() > BATCH and rank0['large_loss']['flipped'].sum() > 0
    for index, flags, halves in (rank0['gathered'], rank1['gathered']):
        assert index.tolist() == [2 ** 60 + 1, 7] and flags.tolist() == [[True, False], [False, True]]
        assert torch.equal(halves.view(torch.int16), HALVES.view(torch.int16))  # NaN, -0 and a subnormal
