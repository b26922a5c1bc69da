"""The RL loader (seeded order per epoch, rank sharding, spares, exact resumption) and the RL data module's
difficulty range and unverified rubrics."""

import json

import pytest

from qed_lightning.data.loading import DataError
from qed_lightning.data.records import ProofProblem
from qed_lightning.data.rl import ProblemBatches, ProofRLDataModule, duplicate_lines, split_validation


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


def test_spare_candidates_ride_with_each_batch_and_resume_exactly():
    loader = ProblemBatches(_problems(20), batch_size=3, seed=2, spares=2)
    assert len(loader) == 4  # 20 // (3 + 2)
    batches = list(loader)
    assert [[p.spare for p in b] for b in batches] == [[False] * 3 + [True] * 2] * 4
    assert len({p.index for b in batches for p in b}) == 20  # prompts and spares: each problem once per epoch

    interrupted = ProblemBatches(_problems(20), batch_size=3, seed=2, spares=2)
    it = iter(interrupted)
    next(it)
    assert [p.index for p in interrupted.peek()] == [p.index for p in batches[1][:3]]  # the prompts only
    state = interrupted.state_dict()
    resumed = ProblemBatches(_problems(20), batch_size=3, seed=2, spares=2)
    resumed.load_state_dict(state)
    assert _indices(resumed) == _indices(batches[1:])


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


RUBRIC = "## Checkpoints (7 pts total)\n- **7 pts**: the proof"


def test_reward_mean_range_keeps_problems_inside_and_counts_both(tiny_model_dir, tmp_path):
    rates = [0.0, 0.05, 0.2, 0.5, 0.9, 1.0]
    rows = [{"problem": f"Prove {i}.", "rubrics": RUBRIC, "reward_mean": r, "scores": [7]} for i, r in enumerate(rates)]
    data = ProofRLDataModule(_write(tmp_path / "d.jsonl", rows), tokenizer=str(tiny_model_dir), prompts_per_step=1,
                             reward_mean_range=(0.1, 0.9))
    data.setup("fit")
    assert sorted(p.pass_rate for p in data.train_problems) == [0.2, 0.5, 0.9]  # both ends included
    assert (data.stats["data/difficulty_kept"], data.stats["data/difficulty_dropped"]) == (3.0, 3.0)

    # without reward_mean the rate is mean(scores) / 7: 0, 0.5, 1 -> only the middle one is in [0.1, 0.9]
    rows = [{"problem": f"Prove {i}.", "rubrics": RUBRIC, "scores": s} for i, s in enumerate([[0, 0], [7, 0], [7, 7]])]
    data = ProofRLDataModule(_write(tmp_path / "s.jsonl", rows), tokenizer=str(tiny_model_dir), prompts_per_step=1,
                             reward_mean_range=(0.1, 0.9))
    data.setup("fit")
    assert [p.problem for p in data.train_problems] == ["Prove 1."]
    assert (data.stats["data/difficulty_kept"], data.stats["data/difficulty_dropped"]) == (1.0, 2.0)


def test_reward_mean_is_checked_only_when_the_range_is_set(tiny_model_dir, tmp_path):
    rows = [{"problem": "Prove it.", "rubrics": RUBRIC, "reward_mean": 1.5},
            {"problem": "Q.", "rubrics": RUBRIC, "reward_mean": 0.5}]
    path = _write(tmp_path / "d.jsonl", rows)
    ProofRLDataModule(path, tokenizer=str(tiny_model_dir), prompts_per_step=1).setup("fit")  # unused column: fine
    with pytest.raises(DataError, match=r"line 1, column 'reward_mean': expected a number in \[0, 1\], got 1.5"):
        ProofRLDataModule(path, tokenizer=str(tiny_model_dir), prompts_per_step=1,
                          reward_mean_range=(0, 1)).setup("fit")
    bare = _write(tmp_path / "b.jsonl", [{"problem": "Q.", "rubrics": RUBRIC}])
    with pytest.raises(DataError, match=r"reward_mean_range needs the base model's pass rate: "
                       r"a column 'reward_mean' or 'scores'"):
        ProofRLDataModule(bare, tokenizer=str(tiny_model_dir), prompts_per_step=1,
                          reward_mean_range=(0, 1)).setup("fit")


def test_unverified_rubrics_are_kept_counted_and_listed(tiny_model_dir, tmp_path):
    rows = [{"problem": "A.", "rubrics": RUBRIC}, {"problem": "B.", "rubrics": "Give 7 points to a full proof."},
            {"problem": "C.", "rubrics": RUBRIC}]
    data = ProofRLDataModule(_write(tmp_path / "d.jsonl", rows), tokenizer=str(tiny_model_dir), prompts_per_step=1)
    data.setup("fit")
    assert len(data.train_problems) == 3 and data.stats["data/rubric_unverified"] == 1.0
    assert data.report["rubric_unverified"] == [{"line": 2, "why": "no line names a 'Checkpoints' section"}]


def test_per_sample_scores_are_range_checked_even_without_the_difficulty_range(tiny_model_dir, tmp_path):
    rows = [{"problem": "A.", "rubrics": RUBRIC, "scores": [7, 0]},
            {"problem": "B.", "rubrics": RUBRIC, "scores": [7, 9]},
            {"problem": "C.", "rubrics": RUBRIC, "scores": [-1]},
            {"problem": "D.", "rubrics": RUBRIC}]  # D: no scores, fine
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"2 of 4 rows are invalid[\s\S]*line 2, column 'scores': score 9 \(item 1\) "
                       r"is not an integer 0..7\n  line 3, column 'scores': score -1 \(item 0\)") as err:
        ProofRLDataModule(path, tokenizer=str(tiny_model_dir), prompts_per_step=1).setup("fit")
    assert path in str(err.value)
    data = ProofRLDataModule(path, tokenizer=str(tiny_model_dir), prompts_per_step=1, on_invalid_row="skip",
                             max_invalid_fraction=0.5)
    data.setup("fit")
    assert sorted(p.problem for p in data.train_problems) == ["A.", "D."]


def test_duplicate_problems_are_reported_and_never_validate(tiny_model_dir, tmp_path, caplog):
    statements = ["Prove A.", "Prove B.", "Prove  A.\n", "Prove C.", "Prove D.", "Prove B.", "Prove E.", "Prove A."]
    rows = [{"problem": s, "rubrics": RUBRIC} for s in statements]
    assert (duplicate_lines([ProofProblem(i, s, "", line=i + 1) for i, s in enumerate(statements)])
            == [[1, 3, 8], [2, 6]])
    for seed in range(5):  # whatever the shuffle, no duplicated statement is drawn into validation
        data = ProofRLDataModule(_write(tmp_path / "d.jsonl", rows), tokenizer=str(tiny_model_dir), prompts_per_step=1,
                                 val_size=3, seed=seed)
        with caplog.at_level("WARNING", logger="qed_lightning.data.rl"):
            data.setup("fit")
        assert sorted(p.problem for p in data.val_problems) == ["Prove C.", "Prove D.", "Prove E."]
        assert len(data.train_problems) == 5 and data.stats["data/duplicate_problems"] == 3.0
        assert data.report["duplicates"] == [[1, 3, 8], [2, 6]]
    assert "2 problem(s) occur more than once" in caplog.text and "lines 1, 3, 8; 2, 6" in caplog.text
    with pytest.raises(DataError, match=r"data.val_size=4, but only 3 problems occur once"):
        ProofRLDataModule(_write(tmp_path / "d.jsonl", rows), tokenizer=str(tiny_model_dir), prompts_per_step=1,
                          val_size=4).setup("fit")


def test_without_duplicates_the_split_is_the_shuffled_head():
    problems = _problems(6)
    val, train = split_validation(problems, 2)
    assert (val, train) == (problems[:2], problems[2:])
