"""tools.vla_demo builds its one-episode split run from eval_libero's own parser: every setting
run_split reads exists (a hand-built Namespace once missed the execution-mode settings added later,
and the README's VLA demo failed with an AttributeError before it started a node)."""

import argparse
import ast
import inspect
from pathlib import Path

from edge_vlm_ros.tools import eval_libero, vla_demo


def _attrs_read(fn) -> set[str]:
    tree = ast.parse(inspect.getsource(fn))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args"}


def test_the_demo_run_has_every_setting_the_split_run_reads(tmp_path):
    demo = argparse.Namespace(suite="libero_spatial", task=2, trial=3, max_steps=99, merge_policy="latest_only",
                              threads=1, timeout_s=60.0)
    run = vla_demo.split_run_args(demo, Path(tmp_path))
    needed = _attrs_read(eval_libero.run_split) | _attrs_read(eval_libero._execution_overrides)
    assert needed, "nothing found: the check would pass vacuously"
    missing = sorted(a for a in needed if not hasattr(run, a))
    assert not missing, missing
    assert (run.tasks, run.trials, run.first_trial, run.max_steps, run.no_wrist) == ([2], 1, 3, 99, True)
    assert run.merge_policy == "latest_only" and run.execution == "async" and run.set == []
    assert eval_libero._execution_overrides(run)["inject_latency_s"] == 0.0
