"""The contract between stage modules and rollout layouts (`rollout.host`): checked once, naming what is missing;
the RL modules implement it; engine capabilities pass through wrappers."""

import pytest

from qed_lightning.modules import RubricRLModule
from qed_lightning.rewards import RubricJudge
from qed_lightning.rollout import AsyncRollouts, HFEngine, StreamingRollouts
from qed_lightning.rollout.engines.vllm_engine import VLLMEngine
from qed_lightning.rollout.host import PeekableLoader, RolloutHost, check_host

from fakes import NoClient


def test_rubric_rl_module_is_a_rollout_host():
    module = RubricRLModule("unused", engine=HFEngine(), judge=RubricJudge(NoClient()), group_size=3)
    assert check_host(module, "StreamingRollouts") is module
    assert isinstance(module, RolloutHost)
    assert module.group_size == 3


def test_a_module_missing_members_is_refused_naming_each():
    class Partial:
        phases = None

        def sampling(self, problems, step=None):
            return None

    with pytest.raises(TypeError,
                       match=r"StreamingRollouts .* Partial lacks group_size, stream_prompts, grade_rollouts"):
        check_host(Partial(), "StreamingRollouts")


def test_engine_capabilities_pass_through_wrappers():
    vllm = VLLMEngine.__new__(VLLMEngine)  # no vLLM started: only the capability is read
    assert vllm.in_process and AsyncRollouts(vllm).in_process and StreamingRollouts(vllm).in_process
    assert not HFEngine().in_process and not AsyncRollouts(HFEngine()).in_process
    assert StreamingRollouts(HFEngine()).streams_groups and not AsyncRollouts(HFEngine()).streams_groups


def test_a_loader_is_peekable_by_its_peek_method():
    class Batches:
        def peek(self):
            return [1]

    assert isinstance(Batches(), PeekableLoader) and not isinstance([], PeekableLoader)


def test_the_prefetch_layout_checks_its_module_at_setup():
    prefetch = next(cb for cb in AsyncRollouts(HFEngine()).callbacks() if type(cb).__name__ == "RolloutPrefetch")
    prefetch.setup(None, RubricRLModule("unused", engine=HFEngine(), judge=RubricJudge(NoClient())), "fit")

    class NoSampling:
        phases, group_size = None, 2

    with pytest.raises(TypeError, match=r"AsyncRollouts .* NoSampling lacks sampling, stream_prompts"):
        prefetch.setup(None, NoSampling(), "fit")
