"""Merge the curve.json files of several `ddlab.fid_curve` runs on one checkpoint (same n, seed and
classifier) into one curve.json / curve.md / curve.png:

    python experiments/fid_curve/merge.py OUT_DIR RUN_DIR [RUN_DIR ...]
"""

import json
import sys
from pathlib import Path

from ddlab.fid_curve import write_outputs

out, runs = Path(sys.argv[1]), [json.loads((Path(d) / "curve.json").read_text()) for d in sys.argv[2:]]
keys = ("ckpt", "n", "seed", "labels_sha256", "feature_extractor")
if any(tuple(r[k] for k in keys) != tuple(runs[0][k] for k in keys) for r in runs):
    sys.exit(f"the runs differ in one of {keys}: they are not points of one curve")
points = [p for r in runs for p in r["points"]]
order = list(dict.fromkeys(p["sampler"] for p in points))  # samplers in the order the runs list them
record = {**runs[0], "points": sorted(points, key=lambda p: (order.index(p["sampler"]), p["steps"]))}
write_outputs(record, out)
