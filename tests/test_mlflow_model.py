"""The winner as an MLflow Model: registered, loadable with pyfunc, served by `mlflow models serve`.

Real store, real data, a real `mlflow models serve` process on a free loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import PAPER, REAL_DATA, needs_real_data
from mlflow import MlflowClient
from services import free_port, wait_until

from fmnas_jax.data import FashionMnistData, load_arrays

pytestmark = [pytest.mark.slow, needs_real_data]


def test_a_trained_genome_is_a_registered_mlflow_model_that_pyfunc_and_serve_run(trained, tmp_path):
    folder = trained[0]  # conftest's +experiment=train run of the paper's genome (read only)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name = 'fmnas-winner'")
    run = client.get_run(version.run_id)
    assert version.tags["genome"] == PAPER and version.tags["param_count"] == str(int(run.data.metrics["param_count"]))
    assert float(version.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-4)
    assert run.data.tags["fmnas.registered_model"] == "fmnas-winner/1"
    assert str(client.get_model_version_by_alias("fmnas-winner", "champion").version) == "1"  # the first version is the best so far

    # A logged model (the Models tab, the run's Logged models), linked to its run and holding the only copy of the weights.
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == run.info.run_id and str(logged.status).endswith("READY")
    assert logged.tags["genome"] == PAPER and run.data.tags["fmnas.mlflow_model"] == f"models:/{logged.model_id}"
    assert [m.model_id for m in client.search_logged_models([run.info.experiment_id])] == [logged.model_id]
    assert run.data.tags["fmnas.checkpoint"] == f"models:/{logged.model_id}/artifacts/checkpoint.msgpack"
    assert not [a.path for a in client.list_artifacts(run.info.run_id) if a.path in ("model", "mlflow_model")]  # no second copy

    # The model's files: code, the msgpack weights, MLflow's metadata; no pickle anywhere.
    local = Path(mlflow.artifacts.download_artifacts(logged.artifact_location, tracking_uri=uri, dst_path=str(tmp_path / "m")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "MLmodel" in files and "artifacts/checkpoint.msgpack" in files and "pyfunc_model.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert "python_model.pkl" not in (local / "MLmodel").read_text()

    # pyfunc on the 10,000 test images (uint8, as Fashion-MNIST stores them) reproduces the logged test accuracy.
    arrays = load_arrays(FashionMnistData(dir=str(REAL_DATA)))
    x_test, y_test = arrays.x_test[..., 0], arrays.y_test
    mlflow.set_tracking_uri(uri)
    predicted = mlflow.pyfunc.load_model("models:/fmnas-winner/1").predict(np.asarray(x_test, np.uint8))
    assert predicted.shape == (10000,)
    assert float(np.mean(predicted == y_test)) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-4)

    # mlflow models serve answers JSON pixel values with class ids, the same as pyfunc.
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/fmnas-winner/1",
                              "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200
            except OSError:
                return serve.poll() is not None  # exited: the assertion below shows the log

        wait_until(up, 180, "mlflow models serve")
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        body = json.dumps({"inputs": np.asarray(x_test[:20]).tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["predictions"] == predicted[:20].tolist()
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
