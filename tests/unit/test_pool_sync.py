"""The pool's one NCCL broadcast group (`rollout.pool_sync`): rank offsets of every server's workers, and a client
that drives all servers at once (they rendezvous with the trainer inside the same NCCL calls, so a client that
waited for one server before asking the next would hang the transfer)."""

from __future__ import annotations

import threading

import pytest

from qed_lightning.rollout.pool_sync import PoolWeightSyncClient, rank_offsets


class Server:
    """A server's weight-sync client that, like a real one, blocks in each call until every server has been called."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier, self.calls = barrier, []

    def _call(self, name, *args):
        self.calls.append((name, *args))
        self.barrier.wait(timeout=5)  # BrokenBarrierError unless the calls to all servers overlap

    def init_weight_transfer_engine(self, init_info):
        self._call("init", init_info["rank_offset"], init_info["world_size"])

    def start_weight_update(self):
        self._call("start")

    def update_weights(self, update_info):
        self._call("update", tuple(update_info["names"]))

    def finish_weight_update(self, weight_version=None):
        self._call("finish", weight_version)


def test_rank_offsets_place_every_worker_after_the_trainer():
    assert rank_offsets([2, 2]) == [1, 3]  # trainer 0, server A workers 1-2, server B workers 3-4
    assert rank_offsets([1]) == [1]  # one server: vLLM's own single-server offset


def test_one_group_for_the_pool_each_server_told_its_offset_and_called_at_once():
    barrier = threading.Barrier(3)
    servers = [Server(barrier) for _ in range(3)]
    pool = PoolWeightSyncClient(servers, worker_counts=[1, 2, 1])
    pool.init_weight_transfer_engine(
        {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1, "world_size": 5})
    pool.start_weight_update()
    pool.update_weights({"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2]]})
    pool.finish_weight_update("3")
    assert [s.calls[0] for s in servers] == [("init", 1, 5), ("init", 2, 5), ("init", 4, 5)]
    assert all(s.calls[1:] == [("start",), ("update", ("w",)), ("finish", "3")] for s in servers)


def test_a_client_per_server_needs_a_worker_count_each():
    with pytest.raises(ValueError, match="2 server clients but 1 worker counts"):
        PoolWeightSyncClient([object(), object()], [1])


def test_the_nccl_rendezvous_port_is_a_free_one_unless_set():
    """A fixed default (29600) collided when two trainers shared a node: unset, the first push picks a free port."""
    import socket

    from qed_lightning.rollout.engines.server_engine import VLLMServerEngine, free_port

    engine = VLLMServerEngine(["http://a:8000"], sync="nccl", nccl_master_address="10.0.0.1")
    assert engine.nccl_port is None
    port = free_port("")
    with socket.socket() as sock:
        sock.bind(("", port))  # it is free: binding it succeeds
    assert VLLMServerEngine(["http://a:8000"], sync="nccl", nccl_master_address="x", nccl_port=29700).nccl_port == 29700
