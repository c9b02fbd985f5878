"""The tags, run roles and limits the store uses in MLflow (names only, no behaviour)."""

from __future__ import annotations

ROLE, GENOME, EVAL_KEY, BUDGET_KEY = "fmnas.role", "genome", "eval_key", "budget_key"


HOST, PID, REASON, DUPLICATE_OF = "fmnas.host", "fmnas.pid", "fmnas.reason", "fmnas.duplicate_of"
RAY_NODE = "fmnas.ray_node"  # backend=ray: the id of the Ray node an evaluation trained on (fmnas.host: the driver's host)


CHECKPOINT = "fmnas.checkpoint"  # where the weights are: models:/<model id>/artifacts/checkpoint.msgpack (before: a run artifact)


MODEL, LOGGED_MODEL = "fmnas.mlflow_model", "model"  # the run's logged model (models:/<model id>), and its name
MODEL_CHECKPOINT = "artifacts/checkpoint.msgpack"  # the weights inside it (its pyfunc artifact `checkpoint`)


REGISTERED = "fmnas.registered_model"  # name/version in the model registry


IMAGE = 28


RUNG = "fmnas.rung"  # multi-fidelity searches: the rung (0 = cheapest budget) an evaluation belongs to


HEARTBEAT = "fmnas.heartbeat"  # unix seconds, refreshed by the process that owns a RUNNING run


REQUEST = "fmnas.request"  # a unique id per create_run call: a retried creation finds the run it already made


PARENT, RUN_NAME = "mlflow.parentRunId", "mlflow.runName"


NOTE = "mlflow.note.content"  # a run's (or experiment's) description in the MLflow UI


PAGE = 1000  # search_runs' page limit


# Housekeeping metrics are logged under a prefix of their own, so the MLflow UI's Chart view groups them
# apart from accuracies (as it groups MLflow's `system/` metrics). The package reads them back by their
# plain names (`StoredEval.metric("wall_seconds")`); runs logged before the prefix keep their plain names.
PERF = "perf/"
PERF_METRICS = frozenset({"compile_seconds", "cache_hits", "train_seconds", "images_per_second", "images_trained", "wall_seconds"})


def logged_name(metric: str) -> str:
    """The name a metric is logged under in MLflow."""
    return PERF + metric if metric in PERF_METRICS else metric


def read_metrics(logged: dict[str, float]) -> dict[str, float]:
    """A run's metrics by the names the package uses (the `perf/` prefix dropped)."""
    return {k.removeprefix(PERF) if k.startswith(PERF) and k[len(PERF) :] in PERF_METRICS else k: v for k, v in logged.items()}


EXPERIMENT_KIND = "mlflow.experimentKind"


METRIC_DECIMALS = 6


SYSTEM_METRICS_STOP_SECONDS = {
    False: 30.0,
    True: 2.0,
}  # how long the system-metrics sampler may take to stop: after success, after an error


EXPERIMENT_NOTE = """Neural architecture search for image-classification CNNs (fmnas_jax).

Runs by role (`tags.fmnas.role`): **search** (one per search: strategy, budget, the winner and its
result card in its description and `report/` artifacts), **evaluation** (one genome at one budget,
nested under the search that trained it; `tags.fmnas.rung` in multi-fidelity searches) and **final**
(a search's winner retrained; its MLflow Model is registered).

Compare within one search: each search run's description links its filtered views (its evaluations, each
rung, its final run), or filter `tags.mlflow.parentRunId = '<search run id>'`; then Chart view (scatter of
`param_count` against `val_accuracy`) or select runs and Compare (parallel coordinates). A search's
progress: its run's `best_fitness` and `best_val_accuracy` metrics (Model metrics tab).
Sorting by a metric flattens the nesting. Winners across searches: `tags.fmnas.role = 'final'`.
"""
