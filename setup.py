"""Package layout (the metadata lives in pyproject.toml).

``configs/`` stays at the top of the repository, where Hydra users expect it, and ships inside the
wheel and the sdist as ``ddlab.configs`` (each config group a sub-package of YAML files), so an
installed ddlab runs from any folder (see the README, "Install and share").
"""

from pathlib import Path

from setuptools import find_packages, setup

CONFIGS = Path(__file__).parent / "configs"
config_packages = ["ddlab.configs"] + sorted(
    "ddlab.configs." + ".".join(d.relative_to(CONFIGS).parts) for d in CONFIGS.rglob("*") if d.is_dir() and d.name != "__pycache__"
)

setup(
    packages=find_packages("src") + config_packages,
    package_dir={"": "src", "ddlab.configs": "configs"},
    package_data={p: ["*.yaml"] for p in config_packages},
)
