"""Convert a data set once into its fast on-disk form.

    python -m ddlab.data.prepare imagenet64 src=<folder with train_data_batch_* and val_data> dst=<cache folder>
        [source=auto|pickle|npz|folder] [image_size=64] [force=true] [on_bad_file=error|skip]

``dst`` defaults to ``<src>/ddlab_cache`` (or a folder under ``~/.cache/ddlab`` when ``src`` is read-only);
pass the same folder as ``data.cache_dir`` when training. Training also converts on first use, so this
step is optional: it lets a cluster job start without the one-off conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ddlab.io import atomic_write, atomic_write_text

from .images import check_on_bad_file, decode_or_skip, find_images, resize_center_crop

log = logging.getLogger(__name__)

SOURCES = ("auto", "pickle", "npz", "folder")
SPLITS = ("train", "val")
CACHE_VERSION = 1
_BATCH = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_VAL = re.compile(r"^val_data(\.npz)?$")

HOW_TO_GET = (
    "Download 'Imagenet64_train' (npz or pickle) and 'Imagenet64_val' from https://image-net.org/download-images "
    "(Downsampled ImageNet, needs an account), unpack them into one folder and set data.path=<folder>; "
    "or give a class-per-folder directory with train/<class>/*.png and val/<class>/*.png (data.source=folder). "
    "On the project machines the offline stand-in is data.path=../shared/data/imagenet64_standin data.num_classes=200."
)


# ---------------------------------------------------------------------------------------------
# source files
def find_array_files(path: Path, kind: str = "auto") -> tuple[str, dict[str, list[Path]]]:
    """``(kind, {"train": [batch files in batch order], "val": [val file]})`` below ``path``.

    ``kind`` is ``pickle`` (files without extension) or ``npz``; ``auto`` picks whichever is present
    (npz when both are)."""
    found: dict[str, dict[str, list[tuple[int, Path]]]] = {"pickle": {"train": [], "val": []}, "npz": {"train": [], "val": []}}
    for p in sorted(path.rglob("*")) if path.is_dir() else []:
        if not p.is_file():
            continue
        m = _BATCH.match(p.name)
        if m:
            found["npz" if m.group(2) else "pickle"]["train"].append((int(m.group(1)), p))
            continue
        m = _VAL.match(p.name)
        if m:
            found["npz" if m.group(1) else "pickle"]["val"].append((0, p))
    if kind == "auto":
        kind = "npz" if found["npz"]["train"] else "pickle"
    files = {s: [p for _, p in sorted(found[kind][s], key=lambda t: (t[0], str(t[1])))] for s in SPLITS}
    return kind, files


def read_array_file(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: ``data (N, 3*R*R) uint8`` and ``labels (N,) int64`` exactly as stored (1-based).
    Raises ``ValueError`` naming the file when it cannot be read or has the wrong layout."""
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("data", "labels") if k not in z.files]
                if missing:
                    raise ValueError(f"{path}: no {' / '.join(missing)} array (found {z.files}); expected the downsampled-ImageNet layout")
                data, labels = z["data"], z["labels"]
        else:
            with open(path, "rb") as f:
                try:
                    d = pickle.load(f)
                except UnicodeDecodeError:  # written by Python 2
                    f.seek(0)
                    d = pickle.load(f, encoding="latin1")
            if not isinstance(d, dict) or "data" not in d or "labels" not in d:
                raise ValueError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(d).__name__}")
            data, labels = np.asarray(d["data"]), np.asarray(d["labels"])
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"cannot read {path}: {e} (corrupt or truncated; obtain the file again)") from e
    except (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"cannot read {path}: {e} (corrupt or truncated; obtain the file again)") from e
    if data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: `data` must be a 2-D uint8 array (N, 3*R*R), got {data.dtype} of shape {data.shape}")
    resolution_of(data.shape[1], path)
    labels = labels.astype(np.int64, copy=False)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape} labels for {data.shape[0]} images (wrong array shape)")
    if len(labels) and labels.min() < 1:
        raise ValueError(f"{path}: labels must be 1-based (downsampled-ImageNet layout), found {labels.min()}")
    return data, labels


def resolution_of(row_length: int, path: Union[Path, str] = "") -> int:
    """Side ``R`` of a channel-planar RGB row of ``3*R*R`` bytes (12288 -> 64, 3072 -> 32)."""
    r = round((row_length / 3) ** 0.5)
    if r < 1 or 3 * r * r != row_length:
        raise ValueError(f"{path}: rows of {row_length} bytes are not 3*R*R channel-planar RGB images (wrong array shape)")
    return r


def _fingerprint(entries: list[tuple[str, int, int]]) -> str:
    h = hashlib.sha1()
    for name, size, mtime in entries:
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def source_fingerprint(path: Path, kind: str, files: Optional[dict[str, list[Path]]] = None, image_size: int = 64) -> str:
    """Changes when a source file is added, removed or rewritten (name, size, mtime); for folders,
    when a class folder changes (its mtime moves when files are added, removed or renamed)."""
    if kind == "folder":
        dirs = sorted(d for s in SPLITS if (path / s).is_dir() for d in [path / s, *(path / s).iterdir()] if d.is_dir())
        entries = [(str(d.relative_to(path)), 0, d.stat().st_mtime_ns) for d in dirs] + [("image_size", image_size, 0)]
    else:
        entries = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for s in SPLITS for p in files[s]]
    return _fingerprint([(f"v{CACHE_VERSION}:{kind}", 0, 0), *entries])


# ---------------------------------------------------------------------------------------------
# cache
def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, arr)


def default_cache_dir(path: Path) -> Path:
    """``<path>/ddlab_cache`` when ``path`` is writable, else ``$XDG_CACHE_HOME/ddlab/imagenet64-<hash of path>``."""
    path = Path(path).resolve()
    if path.is_dir() and os.access(path, os.W_OK):
        return path / "ddlab_cache"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ddlab" / f"imagenet64-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"


def read_meta(cache_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(cache_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def prepare_imagenet64(src: Union[str, os.PathLike], dst: Union[str, os.PathLike, None] = None, source: str = "auto",
                       image_size: int = 64, force: bool = False, on_bad_file: str = "error") -> dict:
    """Convert ``src`` once into the memory-mapped cache in ``dst`` (default: ``default_cache_dir(src)``)
    and return its ``meta`` dict. A cache whose fingerprint matches the source is reused as is."""
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: choose from {', '.join(SOURCES)}")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"ImageNet-64: data.path={src} is not a folder. {HOW_TO_GET}")
    dst = Path(dst) if dst is not None else default_cache_dir(src)
    kind, files = "folder", None
    if source != "folder":
        kind, files = find_array_files(src, source)
        if not files["train"] and source == "auto" and (src / "train").is_dir():
            kind, files = "folder", None
    if kind != "folder":
        for split, names in (("train", "train_data_batch_<k>"), ("val", "val_data")):
            if not files[split]:
                raise FileNotFoundError(
                    f"ImageNet-64: no {names}{'.npz' if kind == 'npz' else ''} file below {src} (data.source={source}). {HOW_TO_GET}"
                )
        if len(files["val"]) > 1:
            raise ValueError(f"ImageNet-64: several val_data files below {src}: {[str(p) for p in files['val']]}; keep one")
    else:
        for split in SPLITS:
            if not (src / split).is_dir():
                raise FileNotFoundError(f"ImageNet-64: data.source=folder needs {src / split}/<class>/<images>. {HOW_TO_GET}")
    check_on_bad_file(on_bad_file)
    fingerprint = source_fingerprint(src, kind, files, image_size) + ("" if on_bad_file == "error" else "-skip")
    meta = read_meta(dst)
    if not force and meta is not None and meta.get("fingerprint") == fingerprint and all(
        (dst / f"{s}_images.u8").is_file() and (dst / f"{s}_labels.npy").is_file() for s in SPLITS
    ):
        return meta
    try:
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "meta.json").unlink(missing_ok=True)  # invalid until the conversion completes
    except OSError as e:
        raise OSError(f"ImageNet-64: cannot write the memory-mapped cache in {dst}: {e}; set data.cache_dir=<writable folder>") from e
    log.info("ImageNet-64: converting %s (%s) into the memory-mapped cache %s (once)", src, kind, dst)
    meta = _convert_folder(src, dst, image_size, on_bad_file) if kind == "folder" else _convert_arrays(src, dst, kind, files)
    meta.update(version=CACHE_VERSION, source=str(src.resolve()), kind=kind, fingerprint=fingerprint)
    atomic_write_text(dst / "meta.json", json.dumps(meta, indent=1))
    return meta


def _convert_arrays(src: Path, dst: Path, kind: str, files: dict[str, list[Path]]) -> dict:
    meta: dict = {"splits": {}}
    resolution = None
    for split in SPLITS:
        labels_all, n = [], 0
        with atomic_write(dst / f"{split}_images.u8") as f:
            for p in files[split]:  # one batch in memory at a time
                data, labels = read_array_file(p, kind)
                r = resolution_of(data.shape[1], p)
                if resolution is not None and r != resolution:
                    raise ValueError(f"{p}: {r}x{r} images, but earlier files hold {resolution}x{resolution}")
                resolution = r
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                labels_all.append(labels - 1)
                n += len(data)
        labels = np.concatenate(labels_all) if labels_all else np.zeros(0, np.int64)
        if n == 0:
            raise ValueError(f"ImageNet-64: the {split} files {[str(p) for p in files[split]]} hold no images")
        _save_npy(dst / f"{split}_labels.npy", labels)
        meta["splits"][split] = {"n": n, "files": [str(p.relative_to(src)) for p in files[split]], "max_label": int(labels.max())}
    meta["resolution"] = resolution
    meta["num_classes"] = meta["splits"]["train"]["max_label"] + 1
    classes = next(iter(sorted(src.rglob("classes.txt"))), None)
    if classes is not None:
        meta["classes"] = classes.read_text().split()
    return meta


def _convert_folder(src: Path, dst: Path, image_size: int, on_bad_file: str = "error") -> dict:
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {c: i for i, c in enumerate(classes)}
    meta: dict = {"splits": {}, "classes": classes, "num_classes": len(classes), "resolution": int(image_size)}
    skipped: list[str] = []
    for split in SPLITS:
        items = []
        for d in sorted((src / split).iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            if d.name not in index:
                raise ValueError(f"ImageNet-64: class folder {d} has no counterpart in {src / 'train'}")
            items += [(p, index[d.name]) for p in find_images(d)]
        if not items:
            raise ValueError(f"ImageNet-64: no images in {src / split}/<class>/ (data.source=folder). {HOW_TO_GET}")
        kept = []
        with atomic_write(dst / f"{split}_images.u8") as f:
            for p, y in items:
                img = decode_or_skip(p, on_bad_file, skipped)
                if img is not None:
                    f.write(resize_center_crop(img, image_size).tobytes())
                    kept.append((p, y))
        items = kept
        if not items:
            raise ValueError(f"ImageNet-64: every image in {src / split} failed to decode (data.on_bad_file=skip)")
        labels = np.array([y for _, y in items], dtype=np.int64)
        _save_npy(dst / f"{split}_labels.npy", labels)
        meta["splits"][split] = {"n": len(items), "max_label": int(labels.max())}
    meta["skipped_files"] = [str(Path(p).relative_to(src)) for p in skipped]
    return meta


USAGE = __doc__


def parse(argv: list[str]) -> tuple[str, dict[str, str]]:
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(USAGE)
    name, opts = argv[0], {}
    for a in argv[1:]:
        key, sep, value = a.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {a!r}\n{USAGE}")
        opts[key] = value
    return name, opts


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name, opts = parse(sys.argv[1:] if argv is None else argv)
    if name != "imagenet64":
        raise SystemExit(f"unknown data set {name!r}: only imagenet64 needs preparing (MNIST and butterflies are read directly)")
    unknown = set(opts) - {"src", "dst", "source", "image_size", "force", "on_bad_file"}
    if unknown or "src" not in opts:
        raise SystemExit(f"imagenet64 takes src=... [dst=...] [source=...] [image_size=...] [force=true]; got {sorted(opts)}\n{USAGE}")
    meta = prepare_imagenet64(
        opts["src"], opts.get("dst"), source=opts.get("source", "auto"), image_size=int(opts.get("image_size", 64)),
        force=opts.get("force", "false").lower() in ("1", "true", "yes"), on_bad_file=opts.get("on_bad_file", "error"),
    )
    n = {s: v["n"] for s, v in meta["splits"].items()}
    print(f"imagenet64: {n} images of {meta['resolution']}x{meta['resolution']}, {meta['num_classes']} classes ({meta['kind']} from {meta['source']})")
    return meta


if __name__ == "__main__":
    main()
