"""Hydra-side helpers for runs and sweeps (this module, like the entry points, may use Hydra).

* :func:`run_metadata` — the overrides typed on the command line (parsed to values) and the git
  commit, logged with the resolved config to every logger (W&B shows them as the run config).
* :func:`guarded` — runs the train function; with ``on_error: inf`` / ``nan`` a failing job logs
  its traceback and returns that value instead of raising, so a sweeper records the trial and goes
  on. ``on_error: raise`` (the default) re-raises: the process exits non-zero.
* :class:`SweepSummary` — a Hydra callback (registered in ``configs/hydra/default.yaml``). In
  multirun mode it writes ``job_return.json`` (status, return value, error) into each job folder
  and rewrites ``summary.csv`` / ``summary.md`` in the sweep folder after every job and at the
  end: one row per job with its overrides, status, returned metric and final metrics
  (``metrics.json``). Written after each job, the summary survives a job that fails.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import subprocess
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ddlab.io import atomic_write_text

log = logging.getLogger("ddlab.sweep")

ON_ERROR = {"raise": None, "inf": math.inf, "nan": math.nan}
DEFAULT_COLUMNS = ("train/loss", "train/mse", "train/vb", "val/mse", "val/fid", "val/fid_best", "val/bpd",
                   "global_step", "params/total")


# ---------------------------------------------------------------------------------- run metadata
def git_commit(cwd: Optional[str] = None) -> str:
    """``git rev-parse HEAD`` of the source tree (``-dirty`` appended when tracked files changed),
    or ``unknown`` outside a git checkout."""
    cwd = cwd or str(Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["model=unet_res", "module.lr=1e-3"]`` -> ``{"model": "unet_res", "module.lr": 0.001}``
    (values typed by Hydra's own override grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, Any] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        try:
            value = o.value()
        except Exception:
            value = o.get_value_element_as_str()
        if hasattr(value, "_content") or not isinstance(value, (str, int, float, bool, list, dict, type(None))):
            value = o.get_value_element_as_str()
        out[o.get_key_element()] = value
    return out


def task_overrides() -> list[str]:
    """The overrides of this job (command line + sweep choice), or ``[]`` outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def run_metadata() -> dict[str, Any]:
    """Extra keys for ``log_hyperparams``: ``overrides`` (typed dict), ``git_commit``."""
    return {"overrides": parse_overrides(task_overrides()), "git_commit": git_commit()}


# ---------------------------------------------------------------------------------- failing jobs
def guarded(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """``fn(cfg)``; on an exception, behave as ``cfg.on_error`` says (raise | inf | nan)."""
    mode = str(cfg.get("on_error", "raise"))
    if mode not in ON_ERROR:
        raise ValueError(f"on_error={mode!r}: choose from {', '.join(ON_ERROR)}")
    try:
        value = fn(cfg)
        name = cfg.get("optimized_metric")
        if value is None and name and _optimizing_sweep():
            raise ValueError(f"optimized_metric={name} was not logged by this run, so the sweeper gets no value; "
                             f"pick a metric the run logs (see its metrics.json), e.g. optimized_metric=val/mse, "
                             f"or make sure it is computed (val/fid needs callbacks.fid.every_n_epochs > 0)")
        return value
    except Exception as e:
        if mode == "raise":
            raise
        log.error("job failed (%s: %s); on_error=%s so it returns %s\n%s", type(e).__name__, e, mode,
                  ON_ERROR[mode], traceback.format_exc())
        return ON_ERROR[mode]


def _optimizing_sweep() -> bool:
    """True in a multirun whose sweeper optimises the returned value (anything but the basic grid)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and "BasicSweeper" not in str(hc.sweeper.get("_target_", ""))


# ---------------------------------------------------------------------------------- sweep summary
def _number(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def collect(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per job folder under ``sweep_dir`` (any folder holding ``.hydra/overrides.yaml``)."""
    import yaml

    rows = []
    root = Path(sweep_dir)
    for ov in sorted(root.glob("**/.hydra/overrides.yaml")):
        job_dir = ov.parent.parent
        row: dict[str, Any] = {"job": str(job_dir.relative_to(root))}
        row["overrides"] = " ".join(yaml.safe_load(ov.read_text()) or [])
        ret = job_dir / "job_return.json"
        info = json.loads(ret.read_text()) if ret.is_file() else {}
        row["status"] = info.get("status", "running")
        row["return_value"] = info.get("return_value")
        if info.get("error"):
            row["error"] = info["error"]
        for name in ("metrics.json", "fid.json"):  # ddlab.train / ddlab.fid results
            mf = job_dir / name
            if mf.is_file():
                data = json.loads(mf.read_text())
                row.update({k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None})
        rows.append(row)
    rows.sort(key=lambda r: [int(p) if p.isdigit() else p for p in r["job"].split(os.sep)])
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def write_summary(sweep_dir: str | os.PathLike, columns: Optional[Sequence[str]] = DEFAULT_COLUMNS) -> list[dict[str, Any]]:
    """Write ``summary.csv`` (every metric) and ``summary.md`` (``columns`` that any job has) in
    ``sweep_dir``; returns the rows."""
    root = Path(sweep_dir)
    rows = collect(root)
    if not rows:
        return rows
    fixed = ["job", "overrides", "status", "return_value"]
    keys = sorted({k for r in rows for k in r} - set(fixed) - {"error"})
    all_cols = fixed + keys + (["error"] if any("error" in r for r in rows) else [])
    s = io.StringIO()
    w = csv.DictWriter(s, fieldnames=all_cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(root / "summary.csv", s.getvalue())
    # the markdown table shows only the overrides that differ between jobs (the swept ones)
    split = [r["overrides"].split() for r in rows]
    common = set.intersection(*(set(o) for o in split)) if len(rows) > 1 else set()
    md_rows = [{**r, "overrides": " ".join(o for o in ov if o not in common)} for r, ov in zip(rows, split)]
    md_cols = fixed + [c for c in (columns or keys) if any(c in r for r in rows)]
    lines = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in md_cols) + " |" for r in md_rows]
    if common:
        lines += ["", "Common to every job: `" + " ".join(o for o in split[0] if o in common) + "`"]
    atomic_write_text(root / "summary.md", "\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: per-job ``job_return.json`` and a sweep-level ``summary.csv`` / ``summary.md``."""

    def __init__(self, columns: Optional[Sequence[str]] = DEFAULT_COLUMNS):
        self.columns = list(columns) if columns else None

    @staticmethod
    def _multirun(config: DictConfig) -> bool:
        from hydra.types import RunMode

        try:
            return config.hydra.mode == RunMode.MULTIRUN
        except Exception:
            return False

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self._multirun(config):
            return
        from hydra.core.utils import JobStatus

        out = Path(config.hydra.runtime.output_dir)
        value = job_return._return_value
        info: dict[str, Any] = {"status": job_return.status.name.lower(), "overrides": list(job_return.overrides or [])}
        if job_return.status == JobStatus.FAILED:
            info["error"] = f"{type(value).__name__}: {value}"
            info["return_value"] = None
        else:
            info["return_value"] = _number(value) if value is not None else None
            if isinstance(info["return_value"], float) and not math.isfinite(info["return_value"]):
                info["return_value"] = str(info["return_value"])  # JSON has no inf/nan
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "job_return.json", json.dumps(info, indent=2))
        try:
            write_summary(config.hydra.sweep.dir, self.columns)
        except Exception as e:  # a summary problem must not fail the job
            log.warning("could not write the sweep summary: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_summary(config.hydra.sweep.dir, self.columns)
        log.info("sweep summary (%d jobs): %s", len(rows), Path(config.hydra.sweep.dir) / "summary.md")
