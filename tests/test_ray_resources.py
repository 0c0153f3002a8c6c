"""The Ray executor hands each cell's ``resources`` (CPUs, GPUs) to Ray, on CPU with a declared GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unpoison.bench import run_grid
from unpoison.bench.store import Store

# A cell kind that reports what Ray gave the task it runs in (imported by the Ray workers as a plugin).
PLUGIN = '''
import os
from unpoison.bench.kinds import KINDS, kind

if "test-resources" not in KINDS:
    @kind("test-resources", "reports the resources Ray assigned to this cell's task")
    def _report(ctx):
        import ray
        return {"assigned": ray.get_runtime_context().get_assigned_resources(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
'''


def _grid(tmp_path: Path, resources: dict) -> dict[int, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    plugin = tmp_path / "report.py"
    plugin.write_text(PLUGIN)
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"name": "res", "kind": "test-resources", "plugins": [str(plugin)],
                                   "axes": {"seed": [0]}, "resources": resources}))
    out = tmp_path / "out"
    run_grid(str(cfg), out, executor="ray", progress=False, allow_plugins=True)
    s = Store.open_existing(out)
    try:
        return {r["config"]["seed"]: r for r in s.rows()}
    finally:
        s.close()


def test_cell_resources_reach_ray(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    try:  # a CPU machine declaring one GPU: Ray schedules on it as on a real one
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Ray cannot start here: {e}")
    try:
        rows = _grid(tmp_path / "a", {"num_cpus": 1, "num_gpus": 0.5})
        too_big = _grid(tmp_path / "b", {"num_cpus": 1, "num_gpus": 2})
    finally:
        ray.shutdown()
    for r in rows.values():
        assert r["status"] == "done", r["error"]
        assert r["results"]["assigned"] == {"CPU": 1.0, "GPU": 0.5}
        assert r["results"]["gpu_ids"] == ["0"] and r["results"]["cuda_visible"] == "0"
    # more GPUs than the cluster has would wait forever: the cell fails at once, saying why
    for r in too_big.values():
        assert r["status"] == "failed" and "asks for 2 GPU" in r["error"] and "1 GPU" in r["error"]
