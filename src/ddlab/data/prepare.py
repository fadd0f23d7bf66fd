"""Convert a data set once into its fast on-disk form.

    python -m ddlab.data.prepare imagenet64 src=<folder with train_data_batch_* and val_data> dst=<cache folder>
        [source=auto|pickle|npz|folder] [image_size=64] [force=true]

``dst`` defaults to ``<src>/ddlab_cache`` (or a folder under ``~/.cache/ddlab`` when ``src`` is read-only);
pass the same folder as ``data.cache_dir`` when training. Training also converts on first use, so this
step is optional: it lets a cluster job start without the one-off conversion.
"""

from __future__ import annotations

import logging
import sys

from .imagenet64 import prepare_imagenet64

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
    unknown = set(opts) - {"src", "dst", "source", "image_size", "force"}
    if unknown or "src" not in opts:
        raise SystemExit(f"imagenet64 takes src=... [dst=...] [source=...] [image_size=...] [force=true]; got {sorted(opts)}\n{USAGE}")
    meta = prepare_imagenet64(
        opts["src"], opts.get("dst"), source=opts.get("source", "auto"), image_size=int(opts.get("image_size", 64)),
        force=opts.get("force", "false").lower() in ("1", "true", "yes"),
    )
    n = {s: v["n"] for s, v in meta["splits"].items()}
    print(f"imagenet64: {n} images of {meta['resolution']}x{meta['resolution']}, {meta['num_classes']} classes ({meta['kind']} from {meta['source']})")
    return meta


if __name__ == "__main__":
    main()
