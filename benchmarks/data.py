"""Data section of ``benchmarks.run``: images/s each DataModule delivers with its configured workers
versus images/s the ddlab training step consumes at that data set's shape and batch."""

from __future__ import annotations

import torch

from benchmarks.common import ROOT, compose, data_names, fmt, now, stats, table
from benchmarks.common import progress as _progress
from benchmarks.train import Case, run_lightning, throughput

SHARED_DATA = ROOT.parent / "shared" / "data"
# Offline stand-ins on the project machines (see each data config's header), used only when the configured path fails.
OFFLINE_DATA = {
    "butterflies": [f"data.path={SHARED_DATA / 'butterflies_leeds'}", "data.source=folder"],
    "imagenet64": [f"data.path={SHARED_DATA / 'imagenet64_standin'}", "data.num_classes=200"],
}


def bench_data(s: dict, dev: torch.device, notes: list) -> list[dict]:
    from hydra.utils import instantiate

    rows = []
    for name in data_names():
        base = [f"data={name}"] + ([f"data.limit={s['data_limit']}"] if s["data_limit"] else [])
        dm, errors = None, []
        for extra in (base, base + OFFLINE_DATA.get(name, [])) if name in OFFLINE_DATA else (base,):
            try:
                cfg = compose(extra)
                dm = instantiate(cfg.data)
                dm.prepare_data()
                dm.setup("fit")
                break
            except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
                dm = None
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        if dm is None:
            notes.append(f"data {name}: skipped ({'; then with the offline stand-in: '.join(errors)})")
            continue
        if extra != base:
            notes.append(f"data {name}: the configured path is absent here; measured on the offline stand-in ({' '.join(extra[len(base):])})")
        _progress(f"data {name}: batch {dm.batch_size}, {dm.num_workers} workers")
        delivered, first = [], []
        for _ in range(s["repeats"]):
            t0 = now(dev)
            it = iter(dm.train_dataloader())
            batch = next(it)
            t1 = now(dev)
            n = 0
            for _ in range(s["data_batches"]):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                batch[0].to(dev, non_blocking=True)
                n += batch[0].shape[0]
            t2 = now(dev)
            del it
            first.append(t1 - t0)
            if n:
                delivered.append(n / (t2 - t1))
        # what the ddlab training step consumes at this data set's shape, batch and default model
        consumed = None
        try:
            case = Case(None, int(dm.image_size), dm.batch_size, dev, s["base_channels"], channels=int(dm.channels),
                        num_classes=int(dm.num_classes), extra=tuple(extra[:1]) + tuple(extra[len(base):]))
            w, st = max(1, s["warmup"]), max(2, s["steps"])
            consumed = stats(throughput(run_lightning(case, w, st), w, dm.batch_size)[0] for _ in range(max(1, s["repeats"] - 1)))
        except Exception as e:  # noqa: BLE001  (reported in the notes, not fatal)
            notes.append(f"data {name}: training consumption not measured ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        rows.append({
            "data": name, "overrides": extra, "batch_size": dm.batch_size, "num_workers": dm.num_workers, "image_shape": [dm.channels, dm.image_size, dm.image_size],
            "delivered_images_per_s": stats(delivered) if delivered else None, "first_batch_s": stats(first),
            "train_step_images_per_s": consumed,
            "data_bound": bool(delivered and consumed and stats(delivered)["median"] < consumed["median"]),
        })
    return rows


def markdown(rows: list[dict]) -> list[str]:
    caption = "**Data loading** (delivered by the DataModule's train loader vs consumed by the ddlab training step at the same shape and batch)"
    return table(caption, ["data", "batch", "workers", "delivered img/s", "first batch s", "train step img/s", "data-bound"],
                 [[r["data"], r["batch_size"], r["num_workers"], fmt(r["delivered_images_per_s"], 0), fmt(r["first_batch_s"], 2),
                   fmt(r["train_step_images_per_s"]), "yes" if r["data_bound"] else "no"] for r in rows])
