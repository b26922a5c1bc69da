"""The RL loader: seeded order per epoch, rank sharding, and exact resumption from its state."""

from qed_lightning.data.rl import ProblemBatches, ProofProblem


def _problems(n: int) -> list[ProofProblem]:
    return [ProofProblem(i, f"problem {i}", "rubric") for i in range(n)]


def _indices(batches) -> list[list[int]]:
    return [[p.index for p in b] for b in batches]


def test_each_pass_is_a_new_seeded_epoch_and_full_batches_only():
    loader = ProblemBatches(_problems(10), batch_size=3, seed=0)
    assert len(loader) == 3  # 10 // 3 full batches; the leftover problem waits for the next order
    first, second = _indices(loader), _indices(loader)
    assert all(len(b) == 3 for b in first + second)
    assert first != second  # epoch 1 is a different permutation
    assert _indices(ProblemBatches(_problems(10), batch_size=3, seed=0)) == first  # same seed, same order
    assert len({i for b in first for i in b}) == 9  # no repeats within an epoch


def test_resume_mid_epoch_continues_without_repeat_or_skip():
    straight = ProblemBatches(_problems(12), batch_size=2, seed=5)
    reference = _indices(straight) + _indices(straight)  # two whole epochs

    interrupted = ProblemBatches(_problems(12), batch_size=2, seed=5)
    it = iter(interrupted)
    seen = [[p.index for p in next(it)] for _ in range(4)]  # 4 of 6 batches trained, then the process dies
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "consumed": 4, "seed": 5}

    resumed = ProblemBatches(_problems(12), batch_size=2, seed=5)
    resumed.load_state_dict(state)
    seen += _indices(resumed) + _indices(resumed)
    assert seen == reference


def test_state_at_an_epoch_boundary_points_to_the_next_epoch():
    loader = ProblemBatches(_problems(6), batch_size=2, seed=1)
    done = _indices(loader)
    assert loader.state_dict() == {"epoch": 1, "consumed": 0, "seed": 1}
    resumed = ProblemBatches(_problems(6), batch_size=2, seed=1)
    resumed.load_state_dict(loader.state_dict())
    nxt = _indices(resumed)
    assert nxt == _indices(ProblemBatches(_problems(6), batch_size=2, seed=1)) or nxt != done  # a fresh order
    fresh = ProblemBatches(_problems(6), batch_size=2, seed=1)
    _indices(fresh)
    assert nxt == _indices(fresh)  # exactly epoch 1 of an uninterrupted loader


def test_ranks_split_the_same_order_and_agree_on_length():
    ranks = [ProblemBatches(_problems(10), batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]  # 10 // (2 * 2)
    a, b = _indices(ranks[0]), _indices(ranks[1])
    flat = [i for batch in a + b for i in batch]
    assert len(flat) == len(set(flat)) == 8
