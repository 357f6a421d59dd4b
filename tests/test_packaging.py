"""pyproject lists every package of the source tree (a non-editable install gets only those)."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dir_of = {name: ROOT / d for name, d in cfg.get("package-dir", {}).items()}
    roots = {"jaxpaged": ROOT / "jaxpaged", "pallas_kernels": ROOT / "pallas_kernels",
             "cpu_kernels": ROOT / "cpu_kernels", **dir_of}
    found = set()
    for name, base in roots.items():
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            if "__pycache__" in rel or any(p.startswith(".") for p in rel):
                continue
            found.add(".".join((name, *rel)))
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"
