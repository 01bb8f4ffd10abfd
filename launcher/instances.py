"""The SageMaker GPU training instance catalog (data in instances.yaml) and lookups."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Gpu:
    model: str
    memory_gib: float
    bf16: bool
    tflops: float
    bandwidth_gbs: float
    compute_capability: float

    @property
    def flash_attention(self) -> bool:
        # FlashAttention-2 needs Ampere (sm80) or newer.
        return self.compute_capability >= 8.0


@dataclass(frozen=True)
class Instance:
    name: str
    gpu: Gpu
    gpu_count: int
    price_per_hour: float
    host_memory_gib: float

    @property
    def family(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def total_gpu_memory_gib(self) -> float:
        return self.gpu.memory_gib * self.gpu_count


def format_usd(x: float | None, missing: str = "-") -> str:
    """Money as every command shows it: cents below $100, whole dollars above."""
    if x is None:
        return missing
    return f"${x:,.2f}" if abs(x) < 100 else f"${x:,.0f}"


@dataclass(frozen=True)
class Catalog:
    instances: dict[str, Instance]
    prices_read: str
    region: str
    spot_discount_range: tuple[float, float]

    def get(self, name: str) -> Instance:
        return self.instances[name]

    def suggest(self, name: str) -> str | None:
        """Closest real name, preferring the same family (ml.p4d.8xlarge -> ml.p4d.24xlarge)."""
        family = name.rsplit(".", 1)[0]
        same_family = [n for n in self.instances if n.rsplit(".", 1)[0] == family]
        for pool, cutoff in ((same_family, 0.0), (list(self.instances), 0.6)):
            match = difflib.get_close_matches(name, pool, n=1, cutoff=cutoff)
            if match:
                return match[0]
        return None


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    raw = yaml.safe_load((Path(__file__).with_name("instances.yaml")).read_text())
    gpus = {k: Gpu(model=k, **v) for k, v in raw["gpus"].items()}
    instances = {
        name: Instance(name=name, gpu=gpus[gpu], gpu_count=count, price_per_hour=price, host_memory_gib=host)
        for name, (gpu, count, price, host) in raw["instances"].items()
    }
    lo, hi = raw["spot_discount_range"]
    return Catalog(instances, str(raw["prices_read"]), raw["region"], (lo, hi))
