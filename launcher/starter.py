"""`sm-qlora init [DEST]`: a commented starter job for people who installed from PyPI and
have no examples/ directory. The templates ship inside the package (launcher/templates)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from launcher.errors import ConfigError, disk_error

# template in launcher/templates -> where it goes under DEST
FILES = {"local.yaml": "local.yaml", "sagemaker.yaml": "sagemaker.yaml", "train.jsonl": "data/train.jsonl"}


def write_starter(dest: str | Path = ".") -> list[Path]:
    """Write the local and SageMaker starter configs and a small dataset into `dest`;
    refuse (nothing written) when any of them exists already."""
    dest = Path(dest)
    targets = {name: dest / rel for name, rel in FILES.items()}
    taken = [str(p) for p in targets.values() if p.exists()]
    if taken:
        raise ConfigError([("DEST", f"{', '.join(taken)} exist(s) already; nothing was written")],
                          "name another directory: sm-qlora init my-job/")
    templates = resources.files("launcher") / "templates"
    written = []
    for name, target in targets.items():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text((templates / name).read_text())
        except OSError as exc:
            raise disk_error(exc, f"init {dest}") from None
        written.append(target)
    return written
