"""Which inputs of a job become SageMaker input channels, said once for both the local
runner and submit: the train and validation files (a local path or an s3:// URI; an
hf:// dataset is read by the job itself) and the model when it is a local directory or
an s3:// prefix (a hub id is downloaded by the job)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from entrypoint.hyperparams import Hyperparameters


@dataclass(frozen=True)
class Channel:
    name: str    # train, validation or model: the job finds it at /opt/ml/input/data/<name>
    source: str  # a local path or an s3:// URI
    field: str   # the hyperparameter it came from, to rewrite once it is uploaded

    @property
    def is_local(self) -> bool:
        return "://" not in self.source


def input_channels(hp: Hyperparameters) -> list[Channel]:
    out = []
    for name in ("train", "validation"):
        value = getattr(hp.data, name)
        if value is not None and not value.startswith("hf://"):
            out.append(Channel(name, value, f"data.{name}"))
    model = hp.model.id
    if model.startswith("s3://") or ("://" not in model and Path(model).is_dir()):
        out.append(Channel("model", model, "model.id"))
    return out
