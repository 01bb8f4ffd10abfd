"""The Hugging Face training images the job runs on: what each ships, and which models it can train.

`compute.image` picks one by name (`2.9.0-transformers5.3.0`) or by stack (`transformers5`);
`auto` is the newest image whose path has been measured on a GPU (bench/README.md) and that can
train the model on the instance's GPU, where the launcher knows the model's type (`for_job`). The launcher alone reads this
table: the job finds its stack from the transformers it imports.
"""

from __future__ import annotations

from dataclasses import dataclass

REPOSITORY = "huggingface-pytorch-training"


@dataclass(frozen=True)
class Image:
    name: str            # what users write in compute.image
    stack: str           # the other name: transformers4 / transformers5
    transformers: str
    peft: str
    torch: str
    py: str
    tag: str             # the ECR tag
    released: str
    measured_on_gpu: bool  # the job's path on this image measured on a GPU (bench/README.md)
    min_compute_capability: float  # its torch's CUDA build: CUDA 13 builds start at Turing (7.5), no Volta


IMAGES = (
    Image("2.8.0-transformers4.56.2", "transformers4", "4.56.2", "0.17.1", "2.8.0", "py312",
          "2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04", "2025", True, 7.0),
    Image("2.9.0-transformers5.3.0", "transformers5", "5.3.0", "0.18.1", "2.9.0", "py312",
          "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04", "2026-04-16", True, 7.5),
)

# Causal-LM model types that transformers 5.3.0 has and 4.56.2 has not (their AutoModelForCausalLM
# tables compared in the two CI venvs): the 4.56.2 image cannot even build these.
NEW_IN_TRANSFORMERS5 = frozenset({
    "afmoe", "blt", "cwm", "exaone_moe", "flex_olmo", "glm4_moe_lite", "glm_moe_dsa", "jais2", "lfm2_moe",
    "longcat_flash", "minimax_m2", "ministral", "ministral3", "nanochat", "nemotron_h", "olmo3", "olmo_hybrid",
    "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "solar_open", "vaultgemma", "youtu",
})
# MoE model types whose 3D experts the job quantizes itself on transformers 5 (entrypoint.experts_tf5);
# any other MoE there would keep its experts in bf16, which the job refuses at start.
NF4_EXPERTS_ON_TRANSFORMERS5 = frozenset({"mixtral", "qwen3_moe"})


def default() -> Image:
    """The newest image whose path has been measured on a GPU (`auto` before the model and
    instance are known; `for_job` is `auto` for a job)."""
    return [i for i in IMAGES if i.measured_on_gpu][-1]


def resolve(choice: str) -> Image:
    """`auto` (`default`, knowing no model), a stack or an image name (the full tag and
    `huggingface-pytorch-training:` accepted). ValueError naming the choices otherwise."""
    if choice == "auto":
        return default()
    wanted = choice.rsplit(":", 1)[-1]
    for image in IMAGES:
        if wanted in (image.name, image.stack, image.tag):
            return image
    names = ", ".join(f"{i.name} ({i.stack})" for i in IMAGES)
    raise ValueError(f"{choice!r} is not an image the job runs on; choose auto, {names}")


def model_problem(image: Image, model_type: str, moe: bool, fused_moe: bool = True) -> str | None:
    """Why `image` cannot train a model of `model_type` (None when it can), with
    training.fused_moe as `fused_moe`."""
    major = int(image.transformers.split(".")[0])
    if major < 5 and model_type in NEW_IN_TRANSFORMERS5:
        return (f"model type {model_type!r} needs transformers 5; image {image.name} ships transformers "
                f"{image.transformers}: set compute.image: transformers5")
    if major >= 5 and moe and model_type not in NF4_EXPERTS_ON_TRANSFORMERS5:
        return (f"on image {image.name} (transformers {image.transformers}) the experts of a {model_type!r} model "
                f"are 3D weights the job does not quantize to 4-bit (only {', '.join(sorted(NF4_EXPERTS_ON_TRANSFORMERS5))}"
                "'s); set compute.image: transformers4")
    if major >= 5 and moe and not fused_moe:
        return (f"training.fused_moe: false asks for the stock MoE path, which image {image.name} (transformers "
                f"{image.transformers}) does not have for 4-bit experts (the job quantizes them itself and only "
                "its fused pass runs them); set compute.image: transformers4, or drop training.fused_moe")
    return None


def gpu_problem(image: Image, gpu) -> str | None:
    """Why `image`'s torch cannot run on `gpu` (launcher.instances.GPU; None when it can)."""
    if gpu.compute_capability < image.min_compute_capability:
        return (f"image {image.name}'s torch is built for CUDA 13, which has no kernels for the {gpu.model} "
                f"(compute capability {gpu.compute_capability}); set compute.image: transformers4")
    return None


def problems(image: Image, cfg, shape) -> list[str]:
    """Why `image` cannot run the job `cfg` on its instance, for the model `shape`
    (launcher.shapes.Shape; None when the launcher cannot see the model)."""
    from launcher.instances import catalog

    out = [gpu_problem(image, catalog().get(cfg.compute.instance_type).gpu)]
    if shape is not None:
        out.append(model_problem(image, shape.model_type, shape.experts > 1, cfg.training.fused_moe))
    return [p for p in out if p]


def describe(image: Image) -> str:
    why = "measured on a GPU" if image.measured_on_gpu else "not yet measured on a GPU"
    return (f"{REPOSITORY}:{image.tag} (transformers {image.transformers}, peft {image.peft}, "
            f"torch {image.torch}; {why})")


def for_job(cfg) -> Image:
    """The image of a JobConfig. `compute.image` as named; `auto`: for a model the launcher can see
    (a local config.json or a built-in shape; nothing is fetched), the newest measured image that
    can train it as configured on the instance's GPU; for one it cannot see, the 4.56.2 image (it
    trains every model type transformers 4.56 has, MoE experts included, on every GPU listed)."""
    from launcher.shapes import resolve as model_shape

    return for_shape(cfg, model_shape(cfg.model.id, network=False) if cfg.compute.image == "auto" else None)


def for_shape(cfg, shape) -> Image:
    """`for_job` where the caller already holds the model's offline shape (None: not seen)."""
    if cfg.compute.image != "auto":
        return resolve(cfg.compute.image)
    if shape is None:
        return IMAGES[0]
    measured = [i for i in IMAGES if i.measured_on_gpu]
    able = [i for i in measured if not problems(i, cfg, shape)]
    return (able or measured)[-1]
