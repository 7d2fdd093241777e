"""--ray: packs and extractions on a local Ray runtime are byte-identical to one process.

One runtime for the whole module (``ray.init(num_cpus=2)``: start-up is slow on two
cores); each coder call starts its own actors, which import torch and load the tiny
fixture model, so the tests are few and each checks several things.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmarc
from llmarc.cli import _ray_argv, run
from llmarc.codecs.llm import CodingSettings, LLMCodec, Segment
from llmarc.codecs.llm_options import LLMOptions
from llmarc.distributed import ClusterError, ray_coder
from llmarc.errors import ModelMismatchError
from tests.conftest import TINY_BPE, make_tree, snapshot

try:
    import ray
except ImportError:  # the tests that need a runtime skip; the others still run
    ray = None

# Small segments and a narrow batch: many lockstep groups, so two actors share the work.
SETTINGS = {"model": str(TINY_BPE), "threads": 1, "segment_length": 16, "batch_width": 2}
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def runtime():
    """One local Ray runtime for the module; its workers inherit the quiet thread settings."""
    if ray is None:
        pytest.skip("the optional Ray extra is not installed (pip install 'llmarc[ray]')")
    saved = {k: os.environ.get(k) for k in QUIET_THREADS}
    os.environ.update(QUIET_THREADS)
    ray.init(num_cpus=2, include_dashboard=False, namespace=ray_coder.NAMESPACE,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def live_llmarc_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("llmarc-")]


def test_bare_ray_flag_means_a_local_runtime() -> None:
    assert _ray_argv(["pack", "src", "out", "--ray"]) == ["pack", "src", "out", "--ray", "local"]
    assert _ray_argv(["pack", "--ray", "src", "out"]) == ["pack", "--ray", "local", "src", "out"]
    for address in ("auto", "ray://head:10001", "10.0.0.5:6379", "local"):
        assert _ray_argv(["test", "a.llma", "--ray", address]) == [
            "test", "a.llma", "--ray", address]
    assert _ray_argv(["extract", "a.llma", "--", "--ray"]) == ["extract", "a.llma", "--", "--ray"]


def test_ray_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    src = make_tree(tmp_path / "src", {"a.txt": b"hello"})
    assert run(["pack", str(src), str(tmp_path / "a.llma"), "--ray"]) == 1
    err = capsys.readouterr().err
    assert err == "llmarc: error: --ray needs the optional Ray extra: pip install 'llmarc[ray]'\n"
    assert not (tmp_path / "a.llma").exists()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Text entries of several lengths (about 30 lockstep groups of 2 x 16 tokens)."""
    rng = random.Random(7)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and",
             "archive", "model", "token", "segment", "\n"]
    files = {f"t{i}.txt": " ".join(rng.choice(words) for _ in range(rng.randrange(20, 90)))
             .encode() for i in range(6)}
    files["sub"] = None
    files["sub/notes.md"] = b"# notes\n\n" + b"a short file with few tokens\n" * 3
    return make_tree(tmp_path_factory.mktemp("ray") / "src", files)


@pytest.fixture(scope="module")
def local_archives(tree: Path, tmp_path_factory) -> dict[str, bytes]:
    """The references, per engine: the same pack in this process, no Ray (made once)."""
    made: dict[str, bytes] = {}

    class Lazy(dict):
        def __missing__(self, engine: str) -> bytes:
            out = tmp_path_factory.mktemp("local") / f"{engine}.llma"
            llmarc.pack(tree, out, codec="llm", llm=LLMOptions(engine=engine, **SETTINGS))
            self[engine] = out.read_bytes()
            return self[engine]

    return Lazy(made)


@pytest.fixture
def coders(monkeypatch: pytest.MonkeyPatch) -> list[ray_coder.RayCoder]:
    """Every RayCoder the pipeline builds during a test, to see what the cluster did."""
    made: list[ray_coder.RayCoder] = []

    class Recording(ray_coder.RayCoder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ray_coder, "RayCoder", Recording)
    return made


@pytest.mark.parametrize(("engine", "workers"),
                         [("int-v2", 1), ("int-v2", 2), ("int-v1", 2), ("lockstep-v1", 2)])
def test_ray_pack_is_byte_identical_and_extracts_without_ray(
    runtime, tree, local_archives, coders, tmp_path, monkeypatch, engine, workers
):
    monkeypatch.setenv(ray_coder.WORKERS_ENV, str(workers))
    out = tmp_path / "ray.llma"
    llmarc.pack(tree, out, codec="llm",
                llm=LLMOptions(ray=runtime, engine=engine, **SETTINGS))
    assert out.read_bytes() == local_archives[engine]
    (coder,) = coders
    assert coder.last_run is not None
    assert coder.last_run.workers == workers
    assert coder.last_run.chunks >= 10  # really split into many groups
    assert len(coder.last_run.pids) == workers  # every worker reported in
    # The Ray-made archive extracts in a plain process, and the actors are gone.
    with llmarc.open(out) as archive:
        archive.extract(tmp_path / "plain")
    assert snapshot(tmp_path / "plain") == snapshot(tree)
    assert live_llmarc_actors() == []


def test_local_archive_extracts_and_tests_on_ray(runtime, tree, local_archives, coders,
                                                 tmp_path, monkeypatch):
    from llmarc.codecs import llm

    monkeypatch.setattr(llm, "DECODE_CHUNK", 8)  # decoding goes in several slices...
    path = tmp_path / "local.llma"
    path.write_bytes(local_archives["int-v2"])
    with llmarc.open(path, model=TINY_BPE, ray=runtime) as archive:
        archive.extract(tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(tree)
    (coder,) = coders
    assert coder.last_run.workers == 2
    assert coder.runs > 1 and coder.starts == 1  # ...on the same actors
    assert live_llmarc_actors() == []


@pytest.mark.parametrize("mix", [0, 3], ids=["carry", "carry-and-mixing"])
def test_context_carry_packs_and_extracts_on_ray_as_in_one_process(
    runtime, tree, coders, tmp_path, monkeypatch, mix
):
    """Chains of 2 segments with 4 carried tokens: the actors get each segment with its
    context (and with mixing, its chain's tokens before it), the archive is the
    one-process one, and extraction runs in rounds."""
    monkeypatch.setenv(ray_coder.WORKERS_ENV, "2")
    carry = {**SETTINGS, "carry": 4, "chain": 2, "mix": mix}
    local, out = tmp_path / "local.llma", tmp_path / "ray.llma"
    llmarc.pack(tree, local, codec="llm", llm=LLMOptions(**carry))
    llmarc.pack(tree, out, codec="llm", llm=LLMOptions(ray=runtime, **carry))
    assert out.read_bytes() == local.read_bytes()
    with llmarc.open(out, model=TINY_BPE, ray=runtime) as archive:
        archive.extract(tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(tree)
    assert coders[-1].runs >= 2  # a round per chain position
    assert live_llmarc_actors() == []


class KillOnce:
    """A progress sink whose token bar kills worker 1 (Ray restarts it) at the first
    finished group, while other groups of that worker are still in flight."""

    def __init__(self) -> None:
        self.killed: list[str] = []

    def start(self, total: int, description: str) -> None: ...
    def close(self) -> None: ...

    def advance(self, n: int) -> None:  # bytes: nothing to do
        ...

    def token_task(self, total: int, description: str) -> KillOnce.Task:
        return KillOnce.Task(self)

    class Task:
        def __init__(self, owner: KillOnce) -> None:
            self.owner = owner

        def close(self) -> None: ...

        def advance(self, n: int) -> None:
            if not self.owner.killed:
                (name,) = [a for a in live_llmarc_actors() if a.endswith("-1")]
                ray.kill(ray.get_actor(name, namespace=ray_coder.NAMESPACE),
                         no_restart=False)
                self.owner.killed.append(name)


def test_killed_actor_is_restarted_and_the_archive_is_identical(
    runtime, tree, local_archives, coders, tmp_path
):
    sink = KillOnce()
    out = tmp_path / "killed.llma"
    llmarc.pack(tree, out, codec="llm", progress=sink, llm=LLMOptions(ray=runtime, **SETTINGS))
    assert sink.killed, "the kill never happened"
    assert out.read_bytes() == local_archives["int-v2"]  # the default engine
    run = coders[0].last_run
    # Its in-flight groups came back either re-run by Ray on the new process or failed
    # and re-queued by the scheduler: one of the two must show.
    assert run.restarts + run.retried >= 1, run
    assert live_llmarc_actors() == []


def test_ray_pack_in_windows_keeps_one_actor_set_and_the_archive(
    runtime, tree, local_archives, coders, tmp_path, monkeypatch
):
    """Windows of 600 bytes of text (issue 22: the driver holds one window, not the
    corpus): the same archive as one local pack, every window on the same actors."""
    from llmarc.codecs import llm_pipeline

    monkeypatch.setattr(llm_pipeline, "WINDOW_BYTES", 600)
    windows: list[int] = []
    original = llm_pipeline.TextEncoder.encode

    def counted(self, datas, names, zstd_size):
        windows.append(sum(map(len, datas)))
        return original(self, datas, names, zstd_size)

    monkeypatch.setattr(llm_pipeline.TextEncoder, "encode", counted)
    out = tmp_path / "windows.llma"  # solid=False: every file its own window item
    llmarc.pack(tree, out, codec="llm", llm=LLMOptions(ray=runtime, **SETTINGS), solid=False)
    monkeypatch.setattr(llm_pipeline.TextEncoder, "encode", original)
    llmarc.pack(tree, tmp_path / "local.llma", codec="llm", llm=LLMOptions(**SETTINGS),
                solid=False)
    assert out.read_bytes() == (tmp_path / "local.llma").read_bytes()
    assert len(windows) >= 3 and max(windows) <= 600, windows
    (coder,) = coders
    assert coder.starts == 1 and coder.runs == len(windows)  # one actor set for all
    assert live_llmarc_actors() == []
    # Extraction decodes a window of output at a time, on one set of actors too.
    with llmarc.open(out, model=TINY_BPE, ray=runtime) as archive:
        archive.extract(tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(tree)
    (_, decoder) = coders
    assert decoder.starts == 1 and decoder.runs >= 3
    assert live_llmarc_actors() == []


def test_worker_with_a_different_model_is_refused(runtime, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from llmarc.model.loader import load_model

    folder = tmp_path / "model"
    shutil.copytree(TINY_BPE, folder)
    loaded = load_model(str(folder), device="cpu", threads=1)
    # The driver has its model; now "the node's copy" differs in one weight.
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, folder / "model.safetensors")
    coder = ray_coder.RayCoder(loaded, CodingSettings(batch_width=2, segment_length=16),
                               LLMOptions(ray=runtime))
    with pytest.raises(ModelMismatchError, match=r"Ray worker \d .*different model"):
        coder.encode_many([[5, 6, 7] * 10])
    assert live_llmarc_actors() == []


def test_a_group_that_keeps_failing_ends_the_run(runtime, monkeypatch):
    from llmarc.model.loader import load_model

    monkeypatch.setenv(ray_coder.WORKERS_ENV, "1")
    loaded = load_model(str(TINY_BPE), device="cpu", threads=1)
    settings = CodingSettings(batch_width=2, segment_length=16)
    coder = ray_coder.RayCoder(loaded, settings, LLMOptions(ray=runtime))
    # A token id past the vocabulary makes the worker's coder raise on every attempt.
    last_error = r"failed 3 times; last error: .*ValueError: one token per row"
    with pytest.raises(ClusterError, match=last_error):
        coder.encode_segments([Segment([3, 4]), Segment([10**7])])
    assert coder.last_run.retried == 2
    assert live_llmarc_actors() == []
    # The same coder still works afterwards (fresh actors per call).
    good = [Segment([5, 6, 7, 8]), Segment([9, 10], [5, 6])]
    assert coder.encode_segments(good) == LLMCodec(loaded, settings).encode_segments(good)


def test_a_failed_ray_pack_leaves_nothing_under_out(runtime, tmp_path, monkeypatch):
    """README "Failure": a group that fails on every actor ends the pack with a one-line
    error, and as for any failed pack nothing is left in OUT's directory (no archive, no
    temporary file) and no actor outlives it.  The failure is real, on the actors: one
    segment sent to them is a token id past the vocabulary, so they raise each time."""
    monkeypatch.setenv(ray_coder.WORKERS_ENV, "1")
    original = ray_coder.RayCoder.encode_segments

    def with_a_bad_segment(self, segments, *args, **kwargs):
        return original(self, [*segments, Segment([10**7])], *args, **kwargs)

    monkeypatch.setattr(ray_coder.RayCoder, "encode_segments", with_a_bad_segment)
    src = make_tree(tmp_path / "src", {"a.txt": b"a text for the actors " * 8})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ClusterError, match="failed 3 times"):
        llmarc.pack(src, out_dir / "a.llma", codec="llm", warn=lambda m: None,
                    llm=LLMOptions(ray=runtime, **SETTINGS))
    assert list(out_dir.iterdir()) == []
    assert live_llmarc_actors() == []


#: Runs the CLI as a terminal would: Ctrl-C raising KeyboardInterrupt.  A child inherits
#: its parent's ignored or blocked signals, and CPython keeps an inherited SIG_IGN; in
#: the full suite's CI runs the interrupted pack twice ran on as if never interrupted.
AS_IN_A_TERMINAL = (
    "import runpy, signal, sys\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "sys.argv = ['llmarc', *sys.argv[1:]]\n"
    "runpy.run_module('llmarc.cli', run_name='__main__', alter_sys=True)\n"
)


def test_ctrl_c_leaves_no_archive_and_no_actors(runtime, tmp_path):
    rng = random.Random(3)
    src = make_tree(tmp_path / "big", {"big.txt": " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "\n"]) for _ in range(20000)).encode()})
    out = tmp_path / "out" / "big.llma"
    out.parent.mkdir()
    env = dict(os.environ, **QUIET_THREADS, LLMARC_MODEL=str(TINY_BPE),
               **{ray_coder.WORKERS_ENV: "1"})
    earlier = set(live_llmarc_actors())  # another test's, still shutting down

    def own_actors() -> set[str]:
        return set(live_llmarc_actors()) - earlier

    proc = subprocess.Popen(
        [sys.executable, "-c", AS_IN_A_TERMINAL, "pack", str(src), str(out), "--codec", "llm",
         "--threads", "1", "--segment-length", "16", "--batch-width", "2", "-q",
         "--ray", runtime],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        # The signal goes when the driver's actors exist (an observable event, not a
        # guess of how long start-up takes); the deadline only guards against a hang.
        deadline = time.monotonic() + 300
        while not own_actors():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the driver never started its actors"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert b"interrupted" in stderr and b"Traceback" not in stderr
    assert list(out.parent.iterdir()) == []  # no archive, no temporary file
    deadline = time.monotonic() + 120  # a hang guard: Ray reports the kills asynchronously
    while own_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not own_actors()


def test_lockstep_refuses_a_different_environment_and_the_integer_engines_accept_it(
        runtime):
    from dataclasses import replace

    from llmarc.distributed.worker import WorkerReport
    from llmarc.model.loader import load_model

    loaded = load_model(str(TINY_BPE), device="cpu", threads=1, engine="lockstep-v1")
    elsewhere = WorkerReport(
        name="worker 3", host="node-b", pid=1, fingerprint=loaded.fingerprint,
        environment={**loaded.environment, "cpu_capability": "SOMETHING-ELSE"},
        dtype=loaded.dtype_name, threads=loaded.threads,
    )
    options = LLMOptions(ray=runtime)
    lockstep = ray_coder.RayCoder(loaded, CodingSettings(2, 16, engine="lockstep-v1"), options)
    with pytest.raises(ClusterError, match=r"worker 3 \(host node-b.*cpu_capability"):
        lockstep._check(elsewhere)
    lockstep._check(replace(elsewhere, environment=dict(loaded.environment)))
    with pytest.raises(ClusterError, match="threads"):
        lockstep._check(replace(elsewhere, environment=dict(loaded.environment), threads=4))
    for engine in ("int-v1", "int-v2"):
        portable = ray_coder.RayCoder(loaded, CodingSettings(2, 16, engine=engine), options)
        portable._check(elsewhere)  # the same numbers anywhere
        with pytest.raises(ModelMismatchError, match="worker 3"):
            portable._check(replace(elsewhere, fingerprint=bytes(32)))
