"""Markdown tables of a GPU-check record (what ``main`` prints; the README explains the columns)."""

from __future__ import annotations

from typing import Any


def _c(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(_c(x) if not isinstance(x, str) else x for x in r) + " |" for r in rows]


def _e2e(sec: dict) -> list[str]:
    rows = []
    for r in sec.get("rows", []):
        ok = r.get("train", {}).get("ok")
        rows.append([r["precision"], _c(ok), _c(r.get("steps")), _c(r.get("train", {}).get("seconds")), _c(r.get("train_loss"), 4),
                     _c(r.get("sample_grid") is not None), _c(r.get("checkpoint") is not None), _c(r.get("resumed_steps")),
                     _c(r.get("skipped_steps"))])
    out = _table(["precision", "train ok", "steps", "wall s", "train loss", "grid", "ckpt", "resumed steps", "fp16 skipped steps"], rows)
    ev = sec.get("eval")
    if ev:
        fid = ev.get("fid", {})
        out.append("")
        out.append(f"ddlab.sample ok: {_c(ev.get('sample', {}).get('ok'))}; ddlab.fid ok: {_c(ev.get('fid_run', {}).get('ok'))} "
                   f"(classifier: {ev.get('classifier')}); " + ", ".join(f"{k} {_c(v, 3)}" for k, v in fid.items() if "fid" in k or "acc" in k))
    return out


def _throughput(sec: dict) -> list[str]:
    rows = []
    for r in sec.get("rows", []):
        if "error" in r:
            rows.append([r["case"], r["error"][:60]] + [""] * 6)
            continue
        b, li = r["bare"], r["lightning"]
        mb = li.get("peak_mb")
        rows.append([r["case"], _c(li["images_per_s"]), _c(b["images_per_s"]), _c(r.get("ratio"), 2),
                     _c(mb, 0), _c(li.get("mfu") * 100 if li.get("mfu") else None), _c(b.get("mfu") * 100 if b.get("mfu") else None),
                     _c(li["cut"] or b["cut"])])
    return _table(["case", "ddlab img/s", "bare img/s", "ddlab / bare", "peak MiB", "MFU ddlab %", "MFU bare %", "cut"], rows)


def _sampling(sec: dict) -> list[str]:
    rows = []
    for r in sec.get("rows", []):
        ips = r["images_per_s"]
        rows.append([f"{r['sampler']}-{r['steps']}", _c(r["batch"]), _c(ips.get("ddlab_joint")), _c(ips.get("ddlab_split")),
                     _c(ips.get("diffusers")), r["faster_batching"], _c(r["ddlab_best_over_diffusers"], 2)])
    out = _table(["sampler", "batch", "joint img/s", "split img/s", "diffusers img/s", "faster", "ddlab best / diffusers"], rows)
    if "measured_faster" in sec:
        out += ["", f"guidance batching: `{sec['measured_faster']}` measured faster here; `auto` resolves to "
                    f"`{sec.get('auto_resolves_to', '?')}` on this device"]
    return out


def _ddp(sec: dict) -> list[str]:
    rows = [[_c(r["devices"]), r["backend"], _c(r.get("ok")), _c(r.get("steps")), _c(r.get("checkpoint")), _c(r.get("seconds"))]
            for r in sec.get("rows", [])]
    return _table(["devices", "backend", "ok", "steps", "checkpoint", "wall s"], rows)


RENDER = {"e2e": ("End to end (CLI subprocesses)", _e2e), "throughput": ("Training throughput", _throughput),
          "sampling": ("Guided sampling", _sampling), "ddp": ("DDP", _ddp)}


def markdown(result: dict) -> str:
    lines = [f"## GPU check: {result['device_name']}{' (quick)' if result['quick'] else ''}", "",
             f"torch {result['machine'].get('torch')}, peak bf16 {_c(result.get('peak_bf16_tflops'))} TFLOP/s "
             f"({result.get('peak_source')}), budget {result['budget_s']:.0f} s, total {_c(result.get('total_seconds'))} s"]
    for key, sec in result["sections"].items():
        title, fn = RENDER[key]
        lines += ["", f"### {title} ({sec['seconds']:.0f} s of {sec['share_s']:.0f} s)", ""]
        lines += fn(sec) if sec.get("rows") or sec.get("eval") else ["(nothing measured)"]
        lines += [f"- note: {n}" for n in sec.get("notes", [])]
    return "\n".join(lines)
