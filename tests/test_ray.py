"""backend=ray on a real two-node Ray cluster: a head and a second node (one CPU each), both on 127.0.0.1.

The cluster's processes (GCS, raylets, object stores, workers) are Ray's own binaries, started by Ray's
`cluster_utils.Cluster` and stopped by this module whatever happens. The searches run through the real
CLI as separate processes, drivers of that cluster, as a user's would.
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import needs_real_data
from helpers import TINY, cli, runs

from fmnas_jax.backends import BackendError, EvalSpec, InProcess, opened
from fmnas_jax.data import FashionMnistData, synthetic_load
from fmnas_jax.genome import Genome
from fmnas_jax.train import TrainConfig

# Ray turns 127.0.0.1 into the machine's outward address unless it runs "single-machine" (this switch, read when
# ray is imported; the CLI's drivers inherit it): every address of the test cluster stays on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from fmnas_jax.backends.ray_tasks import Ray  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one cluster, on one pytest-xdist worker
RAY_NODE = "fmnas.ray_node"
SPEC = EvalSpec(TrainConfig(epochs=2, batch_size=64), FashionMnistData(train_size=512, val_size=256), 0)
GENOMES = [Genome.parse(g) for g in ("NC 4 3 relu;RC 8 3 relu;NC 4 3 relu;RC 8 3 relu;FL relu;",
                                      "NC 8 5 gelu;RC 8 3 swish;NC 4 1 tanh;RC 16 3 relu;FL sigmoid;")]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """Head and one more node on loopback, one CPU each; this process is a driver too (to read resources)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    session = c.head_node.get_session_dir_path()
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        ray.init(address=c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
    deadline = time.time() + 30
    while (left := _processes_of(session)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes outlived the test cluster: {left}"


def _processes_of(session: str) -> list[str]:
    """Live processes whose command line names the cluster's session folder (GCS, raylets, workers, agents)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if session in cmd and state != "Z":  # a zombie is dead, only not reaped yet
            found.append(f"{pid}: {cmd[:120]}")
    return found


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _idle(timeout: float = 60) -> bool:
    """Every CPU of the cluster free again (no task of ours still running) within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU", -1):
            return True
        time.sleep(0.5)
    return False


def test_the_backend_matches_in_process_and_a_failure_is_a_result(cluster):
    with opened(InProcess(synthetic_load)) as home:
        solo = dict(home.evaluate(GENOMES, SPEC))
    with opened(Ray(cluster.address, loader=synthetic_load)) as backend:
        assert backend.parallelism == 2 and "2 node(s)" in backend.description and not backend.streams_epochs
        got = dict(backend.evaluate(GENOMES, SPEC))
        too_big = EvalSpec(TrainConfig(epochs=1, batch_size=4096), SPEC.data, 0)  # more than the 512 images
        ((_, bad),) = list(backend.evaluate(GENOMES[:1], too_big))
    for g in GENOMES:
        assert got[g].status == "FINISHED" and got[g].node in _alive_nodes()
        assert got[g].history["train_loss"] == pytest.approx(solo[g].history["train_loss"], rel=1e-5)  # the same trainer
        assert got[g].val_accuracy == pytest.approx(solo[g].val_accuracy, abs=1e-2)  # a near-tie may flip an image
    assert bad.status == "FAILED" and "batch_size 4096 exceeds the 512 training images" in bad.reason and "on Ray node" in bad.reason
    assert _idle()


def test_a_cluster_too_small_for_one_evaluation_is_refused_naming_the_settings(cluster):
    with pytest.raises(BackendError, match=r"has 2 CPUs and 0 GPUs: not enough .* backend.num_cpus=4"):
        Ray(cluster.address, num_cpus=4, loader=synthetic_load)
    with pytest.raises(BackendError, match=r"backend.num_gpus=0.5"):
        Ray(cluster.address, num_cpus=1, num_gpus=0.5, loader=synthetic_load)


def _search(cwd, address: str, *extra: str) -> list[str]:
    return [*TINY, "backend=ray", f"backend.address={address}", *extra]


@needs_real_data
def test_a_search_trains_on_both_nodes_and_a_rerun_trains_nothing(cluster, tmp_path):
    """(That a Ray task's results equal in-process training is the backend-level test above.)"""
    first = cli(tmp_path, *_search(tmp_path, cluster.address))
    assert "Ray cluster at" in first.stdout + first.stderr and "2 node(s)" in first.stdout + first.stderr
    evals = runs(tmp_path, "evaluation")
    assert len(evals) >= 3 and all(r.info.status == "FINISHED" for r in evals)  # the population of 2 at once, then the climb
    nodes = {r.data.tags[RAY_NODE] for r in evals}
    assert nodes == _alive_nodes()  # two distinct nodes trained, and only the cluster's
    assert all(r.data.tags["fmnas.host"] for r in evals)  # beside the driver's host

    second = cli(tmp_path, *_search(tmp_path, cluster.address))
    assert "0 trained" in second.stdout + second.stderr
    assert len(runs(tmp_path, "evaluation")) == len(evals)
    assert _idle()


def _running(cwd) -> int:
    return len(runs(cwd, "evaluation", "RUNNING")) if (cwd / "mlflow.db").exists() else 0


def _start(cwd, args: list[str]) -> subprocess.Popen:
    log = (cwd / "log.txt").open("w")
    return subprocess.Popen([sys.executable, "-m", "fmnas_jax", *args, "progress=false"], cwd=cwd, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509  # fmt: skip


def _wait_for_two_running(cwd, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while _running(cwd) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None and _running(cwd) >= 2, (cwd / "log.txt").read_text()[-3000:]


@needs_real_data
def test_ctrl_c_cancels_the_tasks_and_leaves_no_run_running(cluster, tmp_path):
    proc = _start(tmp_path, _search(tmp_path, cluster.address, "trainer.epochs=200", "data.train_size=5000"))
    try:
        _wait_for_two_running(tmp_path, proc)
        time.sleep(8)  # both nodes are inside training now (each evaluation would take many minutes)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "log.txt").read_text()
    assert rc == 130, out[-3000:]
    assert "run the same command again to resume" in out and "Traceback" not in out
    evals = runs(tmp_path, "evaluation")
    assert not [r for r in evals if r.info.status == "RUNNING"]
    killed = [r for r in evals if r.info.status == "KILLED"]
    assert len(killed) >= 2 and all("interrupted" in r.data.tags["fmnas.reason"] for r in killed)
    assert [r.info.status for r in runs(tmp_path, "search")] == ["KILLED"]
    assert _idle(30)  # the tasks were cancelled on the cluster, not left training


@needs_real_data
def test_removing_a_node_while_it_trains_loses_no_evaluation(cluster, tmp_path):
    """The second node dies mid-training: Ray retries its task on the head; every evaluation ends FINISHED, once."""
    (second,) = [n for n in cluster.worker_nodes]
    # Evaluations long enough (4 epochs on 4,000 images) that the node dies inside one; the population of 2 starts on
    # both nodes at once, and nothing after it is needed (search.budget=0).
    proc = _start(tmp_path, _search(tmp_path, cluster.address, "search.budget=0", "trainer.epochs=4", "data.train_size=4000"))
    try:
        _wait_for_two_running(tmp_path, proc)
        time.sleep(4)  # the second node is training one of them
        cluster.remove_node(second, allow_graceful=False)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # for any test after this one
    out = (tmp_path / "log.txt").read_text()
    assert rc == 0, out[-3000:]
    evals = runs(tmp_path, "evaluation")
    assert evals and all(r.info.status == "FINISHED" for r in evals), Counter(r.info.status for r in evals)
    assert max(Counter(r.data.tags["eval_key"] for r in evals).values()) == 1  # each trained once
    assert [r.info.status for r in runs(tmp_path, "search")] == ["FINISHED"]
