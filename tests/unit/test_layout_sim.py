"""The layout simulator on cases small enough to work out by hand (qed_lightning.tools.layout_sim)."""

import pytest

from qed_lightning.tools.layout_sim import Layout, Throughputs, Workload, simulate

# 2 prompts x G=2 = 4 rollouts of 100 tokens per step; one device decodes 100 tokens/s in all and trains 100 tokens/s
TP = Throughputs(gen_tokens_per_s=100, train_tokens_per_s=100)
WORK = Workload(prompts_per_step=2, group_size=2, lengths=(100,), steps=5)


def test_colocated_is_generate_then_train_then_push():
    # generation: 400 tokens at 100/s = 4 s; training: 400 tokens at 100/s = 4 s; push 1 s -> 9 s a step.
    # The devices work 8 of every 9 s: idle 1/9.
    result = simulate(Layout("colocated", 1, 1, colocated=True), Throughputs(100, 100, push_s=1.0), WORK)
    assert result.step_s == pytest.approx([9.0] * 5)
    assert result.gen_idle == pytest.approx(1 / 9)
    assert result.lag_histogram() == {0: 1.0}


def test_disaggregated_max_lag_0_waits_for_every_step():
    # generators wait for the weights of step k before step k+1: 4 s generate + 4 s train, each side idle half the time
    result = simulate(Layout("1+1", 1, 1, max_lag=0), TP, WORK)
    assert result.step_s == pytest.approx([8.0] * 5)
    assert result.gen_idle == pytest.approx(0.5)
    assert result.train_idle == pytest.approx(0.5)
    assert result.lag_histogram() == {0: 1.0}


def test_disaggregated_max_lag_1_overlaps_generation_and_training():
    # steps 0 and 1 start together and share the decoder (8 sequences at 12.5 tokens/s: all done at 8 s); step 0
    # trains 8-12 s, step 1 12-16 s (its groups were ready at 8 s), and from then on step k+1 generates (4 s) while
    # step k trains (4 s): 4 s a step. Step 0 is on-policy, every later sample one step old.
    result = simulate(Layout("1+1", 1, 1, max_lag=1), TP, WORK)
    assert result.step_s == pytest.approx([12.0, 4.0, 4.0, 4.0, 4.0])
    assert result.mean_step_s == pytest.approx(4.0)
    assert result.lag_histogram() == pytest.approx({0: 0.2, 1: 0.8})


def test_single_sequence_speed_makes_the_long_tail_cost():
    # one 1,000-token sequence and three of 10: with a 10 tokens/s per-sequence cap the long one takes 100 s however
    # fast the pool is, so the pool sits mostly idle
    work = Workload(prompts_per_step=1, group_size=1, lengths=(1000,), steps=2)
    tp = Throughputs(gen_tokens_per_s=1000, seq_tokens_per_s=10, train_tokens_per_s=1e9)
    result = simulate(Layout("colocated", 1, 1, colocated=True), tp, work)
    assert result.step_s == pytest.approx([100.0, 100.0])
    assert result.gen_idle == pytest.approx(0.99)


def test_judge_concurrency_serialises_grading():
    # 4 rollouts finish together at 4 s; a judge answering 1 call at a time in 2 s grades the last at 12 s
    tp = Throughputs(gen_tokens_per_s=100, train_tokens_per_s=1e9, judge_latency_s=2.0, judge_concurrency=1)
    result = simulate(Layout("colocated", 1, 1, colocated=True), tp, WORK)
    assert result.step_s[0] == pytest.approx(12.0)


def test_heavy_tail_streaming_respects_max_lag_and_drops_stale_groups():
    work = Workload(prompts_per_step=8, group_size=4, lengths=(50,) * 8 + (2000,), steps=20, seed=1)
    tp = Throughputs(gen_tokens_per_s=1000, seq_tokens_per_s=50, train_tokens_per_s=2000, push_s=0.5)
    for lag in (1, 2):
        result = simulate(Layout("1+1", 1, 1, max_lag=lag), tp, work)
        assert max(result.lags) <= lag
        assert len(result.lags) == 20 * 8 * 4
    lag1 = simulate(Layout("1+1", 1, 1, max_lag=1), tp, work)
    assert lag1.stale_dropped > 0  # slow groups overtaken by faster ones outlive the lag bound
    sync = simulate(Layout("1+1", 1, 1, max_lag=0), tp, work)
    assert lag1.mean_step_s < 0.6 * sync.mean_step_s


def test_bad_layout_is_refused_with_every_problem():
    with pytest.raises(ValueError, match="generating.*max_lag"):
        simulate(Layout("x", 0, 1, max_lag=-1), TP, WORK)
