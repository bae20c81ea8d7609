"""Finding and extracting LoRA weights from every output shape a trainer may use."""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import json
import lzma
import struct
import tarfile
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from selfie_lora.adapters.replicate.outputs import (
    extract_safetensors,
    find_weights_url,
    is_safetensors,
)
from selfie_lora.errors import WeightsNotFoundError

TAR = "https://replicate.delivery/xezq/abc/trained_model.tar"
ST = "https://replicate.delivery/xezq/abc/lora.safetensors?sig=1"
PNG = "https://replicate.delivery/xezq/abc/sample.png"
LOG = "https://replicate.delivery/xezq/abc/log.txt"
LORA = save(
    {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((2, 4), np.float32)},
    metadata={"format": "pt"},
)


class FileOutputLike:
    def __init__(self, url: str) -> None:
        self.url = url


# --------------------------------------------------------------------------- find_weights_url


@pytest.mark.parametrize(
    ("output", "url", "method"),
    [
        ({"version": "o/n:" + "a" * 64, "weights": TAR}, TAR, "output.weights (tar)"),
        (TAR, TAR, "output (tar)"),
        ([LOG, TAR, PNG], TAR, "output[1] (tar)"),
        ([TAR, ST], ST, "output[1] (safetensors)"),
        ({"weights": [TAR]}, TAR, "output.weights[0] (tar)"),
        ({"weights": ST}, ST, "output.weights (safetensors)"),
        (
            {"files": {"lora": "https://x.test/lora.zip"}},
            "https://x.test/lora.zip",
            "output.files.lora (zip)",
        ),
        (
            {"weights": "https://x.test/opaque-id"},
            "https://x.test/opaque-id",
            "output.weights (unrecognised extension)",
        ),
        ("https://x.test/opaque-id", "https://x.test/opaque-id", "output (unrecognised extension)"),
        (FileOutputLike(TAR), TAR, "output (tar)"),
        ({"weights": FileOutputLike(ST)}, ST, "output.weights (safetensors)"),
        ({"weights": "https://x.test/t.tar.gz"}, "https://x.test/t.tar.gz", "output.weights (tar)"),
    ],
)
def test_finds_weights_in_known_shapes(output: object, url: str, method: str) -> None:
    assert find_weights_url(output) == (url, method)


def test_a_weights_key_wins_a_tie() -> None:
    output = {"backup": "https://x.test/a.tar", "weights": "https://x.test/b.tar"}
    assert find_weights_url(output)[0] == "https://x.test/b.tar"


def test_a_weights_key_wins_over_another_files_kind() -> None:
    # The base model's autoencoder beside the trained tar: the tar under "weights" is the LoRA.
    output = {"weights": "https://x.test/trained_model.tar", "base": "https://x.test/ae.safetensors"}
    assert find_weights_url(output) == ("https://x.test/trained_model.tar", "output.weights (tar)")


def test_a_weights_like_key_without_extension_is_trusted() -> None:
    output = {"log": "https://x.test/run", "lora_weights": "https://x.test/output"}
    assert find_weights_url(output) == ("https://x.test/output",
                                        "output.lora_weights (unrecognised extension)")


@pytest.mark.parametrize(
    "other",
    [
        {"samples": "https://x.test/samples.zip"},  # the key beats another file's kind
        {"training_logs": "https://x.test/logs.tar.gz"},
        {"lora_checkpoints": ["https://x.test/lora_000000500.safetensors"]},  # an intermediate
        {"base_model": "https://x.test/ae.safetensors"},  # "model" is not a weights word
        {"vae_model": "https://x.test/ae.safetensors"},
    ],
)
@pytest.mark.parametrize("weights", ["https://x.test/trained_model.tar", "https://x.test/opaque-id"])
def test_the_weights_key_wins_with_or_without_an_extension(
    other: dict[str, Any], weights: str
) -> None:
    # One ranking in every case: the weights key, then other weights-like keys, then the kind.
    for output in ({"weights": weights, **other}, {**other, "weights": weights}):
        assert find_weights_url(output)[0] == weights


@pytest.mark.parametrize("final_key", ["trained_model", "lora", "output", "result"])
@pytest.mark.parametrize(
    "intermediate",
    [
        {"lora_checkpoints": ["https://x.test/lora_000000500.safetensors",
                              "https://x.test/lora_000000750.safetensors"]},
        {"checkpoint_weights": "https://x.test/step500.safetensors"},
        {"lora_steps": ["https://x.test/step500.safetensors"]},
        {"intermediateLora": "https://x.test/step500.safetensors"},
        {"samples": "https://x.test/samples.safetensors"},
    ],
)
def test_an_intermediate_checkpoint_never_beats_the_final_weights_under_any_key(
    final_key: str, intermediate: dict[str, Any]
) -> None:
    # "lora_checkpoints" says "lora", but it names a half-trained step's file: ranked by its
    # word "lora" its .safetensors beat the final .tar on kind, and it holds LoRA tensors.
    for output in ({final_key: "https://x.test/trained_model.tar", **intermediate},
                   {**intermediate, final_key: "https://x.test/trained_model.tar"}):
        assert find_weights_url(output)[0] == "https://x.test/trained_model.tar"


def test_an_intermediate_checkpoint_is_taken_when_it_is_all_there_is() -> None:
    output = {"lora_checkpoints": ["https://x.test/lora_000000500.safetensors"]}
    assert find_weights_url(output)[0] == "https://x.test/lora_000000500.safetensors"


@pytest.mark.parametrize(
    ("key", "weights_like"),
    [("lora", True), ("LoRA", True), ("loraWeights", True), ("lora_weights", True),
     ("trained_model", True), ("safetensors", True), ("base_model", False),
     ("vae_model", False), ("model", False), ("modelling", False)],
)
def test_weights_like_keys_are_matched_by_their_words(key: str, weights_like: bool) -> None:
    # A URL without a known extension is trusted only under a weights-like key.
    output = {key: "https://x.test/opaque-id", "log": "https://x.test/run"}
    if weights_like:
        assert find_weights_url(output)[0] == "https://x.test/opaque-id"
    else:
        with pytest.raises(WeightsNotFoundError):
            find_weights_url(output)
    # ... and a known kind under it beats one under a key that is not weights-like.
    output = {"base": "https://x.test/a.safetensors", key: "https://x.test/b.tar"}
    assert find_weights_url(output)[0] == ("https://x.test/b.tar" if weights_like
                                           else "https://x.test/a.safetensors")


@pytest.mark.parametrize(
    "output",
    [None, {}, [], "not a url", {"version": "o/n:abc"}, [PNG, LOG], {"images": [PNG]}, 42],
)
def test_no_weights_raises(output: object) -> None:
    with pytest.raises(WeightsNotFoundError) as caught:
        find_weights_url(output)
    assert "no LoRA file" in caught.value.user_message


_NOISE_URLS = st.sampled_from([PNG, LOG, "https://x.test/config.yaml", "https://x.test/a.json"])
_SCALARS = st.one_of(st.none(), st.integers(), st.text(max_size=8), st.booleans(), _NOISE_URLS)
_KEYS = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)


@functools.cache
def _nest(url: str, *, wrapped: bool = False) -> st.SearchStrategy[object]:
    """A random tree of dicts and lists with ``url`` (in a FileOutputLike when ``wrapped``) at
    one random leaf. Made once per leaf: a strategy made anew for every example was checked and
    measured anew by Hypothesis each time, most of what an example cost."""

    def wrap(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
        as_dict = st.tuples(inner, _KEYS, st.dictionaries(_KEYS, _SCALARS, max_size=3)).map(
            lambda t: {**t[2], t[1]: t[0]}
        )
        as_list = st.tuples(inner, st.lists(_SCALARS, max_size=3), st.integers(0, 3)).map(
            lambda t: [*t[1][: t[2]], t[0], *t[1][t[2] :]]
        )
        return st.one_of(as_dict, as_list)

    leaf = st.builds(FileOutputLike, st.just(url)) if wrapped else st.just(url)
    return st.recursive(leaf, wrap, max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    url=st.sampled_from([TAR, ST, "https://x.test/w.tar.xz", "https://x.test/w.zip"]),
    wrapped=st.booleans(),
)
def test_weights_nested_anywhere_are_found(data: st.DataObject, url: str, wrapped: bool) -> None:
    output = data.draw(_nest(url, wrapped=wrapped))
    found, method = find_weights_url(output)
    assert found == url
    assert method.startswith("output")


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_safetensors_beats_a_tar_wherever_they_are(data: st.DataObject) -> None:
    output = [data.draw(_nest(TAR)), data.draw(_nest(ST))]
    if data.draw(st.booleans()):
        output.reverse()
    assert find_weights_url(output)[0] == ST


# --------------------------------------------------------------------------- extract


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


REPLICATE_TAR = {
    "output/flux_train_replicate/config.yaml": b"job: extension\n",
    "output/flux_train_replicate/captions/000.txt": b"a photo of TOK",
    "output/flux_train_replicate/lora.safetensors": LORA,
}


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_extracts_from_a_tar_with_any_compression(mode: str) -> None:
    weights, detail = extract_safetensors(_tar(REPLICATE_TAR, mode), source_name="trained_model.tar")
    assert weights == LORA
    assert detail == "tar member output/flux_train_replicate/lora.safetensors (named lora.safetensors)"


def test_extracts_from_a_zip_and_a_direct_file() -> None:
    assert extract_safetensors(_zip(REPLICATE_TAR), source_name="x.zip")[0] == LORA
    assert extract_safetensors(LORA, source_name="lora.safetensors") == (LORA, "direct safetensors")


@pytest.mark.parametrize(
    ("compress", "name"),
    [(gzip.compress, "gzip"), (bz2.compress, "bz2"), (lzma.compress, "xz")],
)
def test_extracts_a_compressed_single_file(compress: Any, name: str) -> None:
    assert extract_safetensors(compress(LORA), source_name="lora.safetensors.gz") == (
        LORA,
        f"{name}-compressed safetensors",
    )


def test_prefers_the_final_file_over_checkpoints() -> None:
    other = save({"x": np.zeros((1,), np.float32)})
    members = {
        "output/lora_000000500.safetensors": other,
        "output/lora_000001000.safetensors": other,
        "output/my_person.safetensors": LORA,
    }
    assert extract_safetensors(_tar(members), source_name="t.tar")[0] == LORA
    only_checkpoints = {k: v for k, v in members.items() if "0" in k}
    only_checkpoints["output/lora_000001000.safetensors"] = LORA
    weights, detail = extract_safetensors(_tar(only_checkpoints), source_name="t.tar")
    assert weights == LORA
    assert "last of 2" in detail


def test_traversal_names_and_links_are_skipped() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        link = tarfile.TarInfo("output/lora.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        evil = tarfile.TarInfo("../../lora.safetensors")
        evil.size = len(LORA)
        archive.addfile(evil, io.BytesIO(LORA))
    with pytest.raises(WeightsNotFoundError):
        extract_safetensors(buffer.getvalue(), source_name="evil.tar")


def test_the_size_cap_counts_real_bytes() -> None:
    with pytest.raises(WeightsNotFoundError, match="cap"):
        extract_safetensors(_tar(REPLICATE_TAR), source_name="t.tar", max_bytes=len(LORA) - 1)
    with pytest.raises(WeightsNotFoundError, match="cap"):
        extract_safetensors(gzip.compress(LORA), source_name="t.gz", max_bytes=10)


def _header(obj: object, payload: bytes = b"") -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"short",
        struct.pack("<Q", 10**12) + b"{}",
        _header([1, 2]),
        _header({}),
        _header({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"1234"),
        _header({"t": {"dtype": "F32"}}),
        struct.pack("<Q", 4) + b"\xff\xfe{}",
    ],
)
def test_malformed_safetensors_are_rejected(data: bytes) -> None:
    assert not is_safetensors(data)
    with pytest.raises(WeightsNotFoundError):
        extract_safetensors(data, source_name="bad")


def test_an_archive_without_weights_or_with_bad_weights_raises() -> None:
    with pytest.raises(WeightsNotFoundError, match=r"no \.safetensors"):
        extract_safetensors(_tar({"config.yaml": b"x"}), source_name="t.tar")
    with pytest.raises(WeightsNotFoundError, match="not a LoRA safetensors file"):
        extract_safetensors(_zip({"lora.safetensors": b"garbage"}), source_name="t.zip")


def test_a_safetensors_file_without_lora_tensors_is_not_taken_for_the_weights() -> None:
    # A base model's VAE listed in the output (or packed as the archive's only .safetensors)
    # is valid safetensors, and was stored as the user's LoRA.
    vae = save({"decoder.conv_in.weight": np.ones((2, 4), np.float32)}, metadata={"format": "pt"})
    for data, name in ((vae, "ae.safetensors"), (_tar({"ae.safetensors": vae}), "t.tar")):
        with pytest.raises(WeightsNotFoundError, match="holds no LoRA tensors"):
            extract_safetensors(data, source_name=name)
    kohya = save({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight":
                  np.ones((2, 4), np.float32)}, metadata={"format": "pt"})
    assert extract_safetensors(kohya, source_name="k.safetensors") == (kohya, "direct safetensors")
