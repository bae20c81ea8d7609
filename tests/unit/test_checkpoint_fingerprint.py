"""What a local checkpoint records of the base it trained on: a checkpoint made on another base
model, in another memory mode or dtype, does not fit the run (see ``flux.checkpoints``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from selfie_lora.adapters.flux.checkpoints import BaseSetup, base_model_identity, fingerprint
from selfie_lora.domain.recipes import get_recipe

RECIPE = get_recipe("local-tiny-v1")
BF16 = BaseSetup(model="tiny-flux-v1", memory_mode="bf16", dtype="torch.float32")


@dataclass(frozen=True)
class Param:
    """What fingerprint reads of a LoRA parameter."""

    shape: tuple[int, ...]


def _made_for(base: BaseSetup) -> dict[str, object]:
    return fingerprint(RECIPE, seed=0, examples=4, params=[Param((4, 8))], base=base)


def test_the_base_is_part_of_what_a_checkpoint_must_match() -> None:
    assert _made_for(BF16) == _made_for(replace(BF16))
    for other in (replace(BF16, memory_mode="nf4"), replace(BF16, dtype="torch.bfloat16"),
                  replace(BF16, model="sha256:another")):
        assert _made_for(other) != _made_for(BF16), other
    # How often it is saved changes nothing of the steps.
    assert fingerprint(replace(RECIPE, checkpoint_every=3), seed=0, examples=4,
                       params=[Param((4, 8))], base=BF16) == _made_for(BF16)


def _folder(root: Path, *, weights: bytes, config: str = '{"num_layers": 1}') -> Path:
    transformer = root / "transformer"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text(config)
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}')
    (transformer / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(weights)
    (root / "model_index.json").write_text("{}")
    return root


def test_a_base_model_folder_is_named_by_its_contents(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 4096  # 1 MiB
    dev = _folder(tmp_path / "dev", weights=weights)
    assert base_model_identity("tiny") == "tiny-flux-v1"
    identity = base_model_identity(str(dev))
    assert identity.startswith("sha256:")
    # A copy elsewhere (another machine's) is the same base.
    copy = shutil.copytree(dev, tmp_path / "elsewhere" / "flux-dev")
    assert base_model_identity(str(copy)) == identity
    # Another config, or other weights of the same size and layout, are another base.
    other_config = _folder(tmp_path / "config", weights=weights, config='{"num_layers": 2}')
    changed = bytearray(weights)
    changed[len(weights) // 2] ^= 0xFF  # inside a sampled block
    other_weights = _folder(tmp_path / "weights", weights=bytes(changed))
    assert base_model_identity(str(other_config)) != identity
    assert base_model_identity(str(other_weights)) != identity
    assert base_model_identity(str(tmp_path / "dev")) != base_model_identity("tiny")
