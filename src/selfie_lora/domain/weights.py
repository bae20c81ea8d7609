"""The layouts a version's LoRA file can be downloaded in."""

from __future__ import annotations

from enum import StrEnum


class WeightsFormat(StrEnum):
    """``diffusers``: the stored file (diffusers' keys, ``.alpha`` tensors; ComfyUI reads it too).
    ``kohya``: kohya sd-scripts' FLUX layout (fused qkv and linear1), for sd-scripts' own tools
    and anything else that only reads that layout."""

    DIFFUSERS = "diffusers"
    KOHYA = "kohya"

    @property
    def file_suffix(self) -> str:
        """What a download's file name carries before ``.safetensors``."""
        return "" if self is WeightsFormat.DIFFUSERS else f"-{self.value}"
