"""Print pip constraints that pin what the NGC base image compiled against its own torch (torch itself,
Transformer Engine, apex, flash-attention, triton) at the versions installed, so that installing the
project can never replace them (containers/Dockerfile). Distributions that are absent are skipped."""

import importlib.metadata as metadata

KEEP = ("torch", "transformer_engine", "transformer_engine_torch", "transformer_engine_cu12",
        "transformer_engine_cu13", "apex", "flash_attn", "triton", "nvidia-modelopt")

for dist in KEEP:
    try:
        print(f"{dist}=={metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        pass
