"""--ray on a cluster of two nodes (Ray's ``cluster_utils.Cluster``: two raylets on this
machine, one CPU each, so the two actors run on different nodes): the archive is the
local one byte for byte, a node removed mid-run is survived, and an interrupted driver
leaves no archive and no actors (issue 22).  One cluster for the module; small trees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmarc
from llmarc.codecs.llm_options import LLMOptions
from llmarc.distributed import ray_coder
from tests.conftest import TINY_BPE, make_tree, snapshot
from tests.test_ray import AS_IN_A_TERMINAL, QUIET_THREADS, SETTINGS, live_llmarc_actors

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:  # the optional extra
    ray = None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head node and a worker node of one CPU each; this process is its driver."""
    if ray is None:
        pytest.skip("the optional Ray extra is not installed (pip install 'llmarc[ray]')")
    saved = {k: os.environ.get(k) for k in QUIET_THREADS}
    os.environ.update(QUIET_THREADS)
    made = Cluster(initialize_head=True,
                   head_node_args={"num_cpus": 1, "include_dashboard": False})
    made.add_node(num_cpus=1)
    made.wait_for_nodes()
    ray.init(address=made.address, namespace=ray_coder.NAMESPACE, log_to_driver=False)
    yield made
    ray.shutdown()
    made.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    files = {f"t{i}.txt": " ".join([f"the quick brown fox {i} jumps over the lazy dog"]
                                   * (12 + 4 * i)).encode() for i in range(8)}
    return make_tree(tmp_path_factory.mktemp("cluster") / "src", files)


@pytest.fixture(scope="module")
def local(tree: Path, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("local") / "local.llma"
    llmarc.pack(tree, out, codec="llm", llm=LLMOptions(**SETTINGS))
    return out.read_bytes()


@pytest.fixture
def coders(monkeypatch: pytest.MonkeyPatch) -> list[ray_coder.RayCoder]:
    made: list[ray_coder.RayCoder] = []

    class Recording(ray_coder.RayCoder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ray_coder, "RayCoder", Recording)
    monkeypatch.setenv(ray_coder.WORKERS_ENV, "2")
    return made


def test_two_nodes_pack_and_extract_byte_identically(cluster, tree, local, coders,
                                                      tmp_path, monkeypatch) -> None:
    free: list[float] = []

    class Watch:
        """A progress sink that records the cluster's free CPUs once the actors run:
        none means each node's one CPU holds an actor, i.e. one actor per node (the
        state API that would name their nodes needs the dashboard)."""

        def start(self, total: int, description: str) -> None: ...
        def advance(self, n: int) -> None: ...
        def close(self) -> None: ...

        def token_task(self, total: int, description: str) -> Watch:
            return self

        def note(self, text: str) -> None:
            if "workers ready" in text:
                free.append(ray.available_resources().get("CPU", 0.0))

    out = tmp_path / "cluster.llma"
    llmarc.pack(tree, out, codec="llm", progress=Watch(),
                llm=LLMOptions(ray=cluster.address, **SETTINGS))
    assert out.read_bytes() == local
    assert sum(n["Alive"] for n in ray.nodes()) == 2 and ray.cluster_resources()["CPU"] == 2
    assert free == [0.0]  # both nodes' CPUs held by the two actors
    assert coders[0].last_run.workers == 2
    with llmarc.open(out, model=TINY_BPE, ray=cluster.address) as archive:
        archive.extract(tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(tree)
    assert live_llmarc_actors() == []


def test_actors_fit_nodes_smaller_than_the_thread_count(cluster, tree, local, coders,
                                                        tmp_path, monkeypatch) -> None:
    """--threads 2 on nodes of one CPU each: an actor reserves at most a node's CPUs (it
    once asked for 2 and waited out START_TIMEOUT for a node that had them), one per
    node, each running that many threads, and the
    archive is the one-process pack's (int-v2 does not depend on the thread count)."""
    from llmarc.distributed import scheduler

    monkeypatch.setattr(scheduler, "START_TIMEOUT", 60.0)  # a fault fails, not hangs
    threads: list[int] = []
    check = ray_coder.RayCoder._check

    def record(self, report) -> None:
        threads.append(report.threads)
        check(self, report)

    monkeypatch.setattr(ray_coder.RayCoder, "_check", record)
    out = tmp_path / "threads.llma"
    llmarc.pack(tree, out, codec="llm",
                llm=LLMOptions(ray=cluster.address, **{**SETTINGS, "threads": 2}))
    assert out.read_bytes() == local
    assert coders[0].last_run.workers == 2
    assert threads and set(threads) == {1}  # every actor runs the one CPU it reserved


def test_a_node_removed_mid_run_is_survived(cluster, tree, local, coders, tmp_path) -> None:
    """The worker node goes away at the first coded group (another joins, so the
    restarted actor has a CPU): its groups are re-run and the archive is unchanged."""
    removed: list[object] = []

    class RemoveOnce:
        def start(self, total: int, description: str) -> None: ...
        def advance(self, n: int) -> None: ...  # bytes
        def close(self) -> None: ...

        def token_task(self, total: int, description: str) -> Tokens:
            return Tokens()

    class Tokens:
        def close(self) -> None: ...

        def advance(self, n: int) -> None:  # tokens: a group is done
            if not removed:
                workers = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
                cluster.remove_node(workers[0])
                removed.append(cluster.add_node(num_cpus=1))

    sink = RemoveOnce()
    out = tmp_path / "removed.llma"
    llmarc.pack(tree, out, codec="llm", progress=sink,
                llm=LLMOptions(ray=cluster.address, **SETTINGS))
    assert removed, "the node was never removed"
    assert out.read_bytes() == local
    run = coders[0].last_run
    assert run.restarts + run.retried >= 1, run
    assert live_llmarc_actors() == []


def test_an_interrupted_driver_leaves_no_archive_and_no_actors(cluster, tree,
                                                               tmp_path) -> None:
    out = tmp_path / "out" / "tree.llma"
    out.parent.mkdir()
    env = dict(os.environ, **QUIET_THREADS, LLMARC_MODEL=str(TINY_BPE),
               **{ray_coder.WORKERS_ENV: "2"})
    earlier = set(live_llmarc_actors())
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_IN_A_TERMINAL, "pack", str(tree), str(out), "--codec",
         "llm", "--threads", "1", "--segment-length", "16", "--batch-width", "2", "-q",
         "--ray", cluster.address],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing
        while not set(live_llmarc_actors()) - earlier:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the driver never started its actors"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr
    assert list(out.parent.iterdir()) == []
    deadline = time.monotonic() + 120
    while set(live_llmarc_actors()) - earlier and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(live_llmarc_actors()) - earlier
