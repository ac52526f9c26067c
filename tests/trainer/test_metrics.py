"""The step line's backend column and the plots, from metrics rows as the trainer writes them.

A local user simulator (``user_simulator.backend: local``) is counted under ``api/user_simulator/*`` like an
API backend, with ``local/user_simulator`` beside it: the line must not call its generations API calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainer.metrics import SINGLE_PASS_NOTE, plot_panels, step_line, write_plots


def backend(role: str, calls: float, failed: float, p50: float, p95: float) -> dict[str, float]:
    return {f"api/{role}/calls": calls, f"api/{role}/failed": failed, f"api/{role}/retries": 0.0,
            f"api/{role}/latency_p50_s": p50, f"api/{role}/latency_p95_s": p95}  # fmt: skip


def row(
    step: int, *backends: dict[str, float], local: tuple[str, ...] = (), **extra: float
) -> dict[str, Any]:
    m: dict[str, Any] = {"step": step, "epoch": 1, "lr": 1e-3, "loss/policy": 1e-8, "loss/total": 1e-8,
                         "reward/mean": 0.1 * step, "reward/std": 0.1, "adv/abs_mean": 0.8, "entropy": 5.0,
                         "kl": 0.0, "clip_frac": 0.0, "grad_norm": 1.2, "time/step_s": 1.0,
                         "throughput/tokens_per_s": 90.0, "episodes/invalid": 0.0, "episodes/invalid_rate": 0.0,
                         "episodes/invalid_total": 0.0, "time/engine_idle_s": 0.3}  # fmt: skip
    for b in backends:
        m.update(b)
    if backends:  # the totals over backends, as merge_snapshots writes them
        for k in ("calls", "failed", "retries"):
            m[f"api/{k}"] = sum(v for key, v in m.items() if key.count("/") == 2 and key.endswith(f"/{k}"))
        m["api/latency_p50_s"] = max(v for key, v in m.items() if key.endswith("/latency_p50_s"))
        m["api/latency_p95_s"] = max(v for key, v in m.items() if key.endswith("/latency_p95_s"))
        m["api/cost"] = 0.0
    m.update({f"local/{r}": 1.0 for r in local}, **extra)
    return m


def backends_column(m: dict[str, Any]) -> str:
    return step_line(m, 3, 1, 0.0).split(" | ")[2]


def test_a_local_user_simulator_is_not_called_an_api() -> None:
    m = row(1, backend("user_simulator", 60, 0, 0.26, 0.33), local=("user_simulator",))
    assert backends_column(m) == "invalid 0 (0%) local user 60 calls 0 failed p50 0.26s p95 0.33s idle 0.30s"


def test_api_backends_keep_the_api_column() -> None:
    m = row(1, backend("user_simulator", 60, 2, 0.5, 1.5), backend("judge", 60, 1, 0.3, 0.9))
    assert backends_column(m) == "invalid 0 (0%) api 120 calls 3 failed p50 0.50s p95 1.50s idle 0.30s"


def test_local_user_and_api_judge_show_both_with_the_apis_own_numbers() -> None:
    m = row(1, backend("user_simulator", 60, 0, 0.2, 0.3), backend("judge", 20, 1, 0.8, 2.5),
            local=("user_simulator",), **{"api/cost": 0.012})  # fmt: skip
    assert backends_column(m) == (
        "invalid 0 (0%) local user 60 calls 0 failed p50 0.20s p95 0.30s "
        "api 20 calls 1 failed p50 0.80s p95 2.50s cost 0.012 idle 0.30s"
    )


def test_metrics_from_before_per_backend_keys_still_read_as_api() -> None:
    m = row(1)
    m.update({"api/calls": 7.0, "api/failed": 0.0, "api/latency_p50_s": 0.1, "api/latency_p95_s": 0.2})
    assert "api 7 calls 0 failed p50 0.10s p95 0.20s" in backends_column(m)


def multi_turn_rows() -> list[dict[str, Any]]:
    # Cumulative counters, as logged: 60, then 63 more, then 70 more (an evaluation's calls among them).
    return [
        row(1, backend("user_simulator", 60, 0, 0.2, 0.3), local=("user_simulator",)),
        row(2, backend("user_simulator", 123, 1, 0.2, 0.4), local=("user_simulator",), **{"eval/reward": 0.3,
            "eval/samples": 16.0, "episodes/invalid": 1.0}),
        row(3, backend("user_simulator", 193, 1, 0.2, 0.3), local=("user_simulator",)),
    ]  # fmt: skip


def write_run(run: Path, rows: list[dict[str, Any]], algorithm: dict[str, Any]) -> Path:
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": algorithm}))
    metrics = run / "logs" / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return metrics


def test_multi_turn_plots_have_api_health_and_training_signals(tmp_path: Path) -> None:
    metrics = write_run(tmp_path / "run", multi_turn_rows(),
                        {"name": "grpo", "updates_per_batch": 1, "kl_coef": 0.0, "max_grad_norm": 1.0})  # fmt: skip
    written = write_plots(metrics, tmp_path / "run" / "plots")
    assert [p.name for p in written] == ["reward.png", "api_health.png", "losses.png", "signals.png", "lr.png",
                                         "training_metrics.png"]  # fmt: skip
    assert all(p.stat().st_size > 1000 for p in written)
    panels = plot_panels(multi_turn_rows(), {"algorithm": {"name": "grpo", "updates_per_batch": 1}})
    calls, failures, latency = panels["api_health"]
    assert calls.series == [("user_simulator (local model)", [(1, 60.0), (2, 63.0), (3, 70.0)])]  # per step
    assert "evaluation" in calls.note
    assert dict(failures.series)["invalid episodes"] == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert dict(failures.series)["user_simulator (local model) failed"] == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert [label for label, _ in latency.series] == ["user_simulator (local model) p50",
                                                      "user_simulator (local model) p95"]  # fmt: skip
    (losses,) = panels["losses"]
    assert losses.note == SINGLE_PASS_NOTE and [label for label, _ in losses.series] == [
        "loss/total (= loss/policy)"
    ]
    assert [p.title.split(" ")[0] for p in panels["signals"]] == ["grad_norm", "kl", "clip_frac:", "entropy"]


@pytest.mark.parametrize("passes", [2, None])
def test_the_single_pass_note_needs_one_pass_in_the_config(passes: int | None) -> None:
    cfg = {"algorithm": {"name": "grpo", "updates_per_batch": passes}} if passes else {}
    assert plot_panels(multi_turn_rows(), cfg)["losses"][0].note == ""


def test_single_turn_plots_skip_api_health(tmp_path: Path) -> None:
    rows = [row(s) for s in (1, 2, 3)]  # GRPO without a user simulator or judge: no api/* keys at all
    metrics = write_run(tmp_path / "run", rows, {"name": "grpo", "updates_per_batch": 1})
    names = [p.name for p in write_plots(metrics, tmp_path / "run" / "plots")]
    assert names == ["reward.png", "losses.png", "signals.png", "lr.png", "training_metrics.png"]
    assert "api_health" not in plot_panels(rows)


def test_plots_of_a_run_without_config_or_metrics(tmp_path: Path) -> None:
    """`launcher plots` on a copied logs/ folder (no config.yaml) or before the first step: no error."""
    (tmp_path / "logs").mkdir()
    metrics = tmp_path / "logs" / "metrics.jsonl"
    metrics.write_text("")
    assert [p.name for p in write_plots(metrics, tmp_path / "plots")] == ["training_metrics.png"]
    metrics.write_text(json.dumps(row(1)) + "\n")
    assert "signals.png" in [p.name for p in write_plots(metrics, tmp_path / "plots")]
