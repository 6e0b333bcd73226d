"""Caffe's trained AlexNet (``bvlc_alexnet``) as an ordinary alexnet_jax checkpoint.

    python -m alexnet_jax.convert --caffemodel bvlc_alexnet.caffemodel --out runs/bvlc_alexnet
    python -m alexnet_jax.convert --npy bvlc_alexnet.npy --out runs/bvlc_alexnet [--mean FILE]
    python -m alexnet_jax.convert --torchvision alexnet-owt-7be5be79.pth --out runs/torchvision_alexnet

(torchvision's net is another one, "one weird trick"'s; see ``alexnet_jax.convert_torchvision``.)

Both files hold the same net, the paper's two-GPU split written as Caffe
groups. Each source is first read into Caffe's own layout (``OIHW`` kernels,
``(out, in)`` FC weights, fc6's inputs in C,H,W order, BGR input); then
:func:`to_towers` does the whole mapping, in one place:

=====  ======================  ============================================
layer  Caffe weights           tower t (of 2) gets
=====  ======================  ============================================
conv1  (96, 3, 11, 11)         outputs [48t, 48t+48); input channels reversed
                               (Caffe reads BGR, our images are RGB)
conv2  (256, 48, 5, 5), g=2    group t: outputs [128t, ...) over its own maps
conv3  (384, 256, 3, 3)        outputs [192t, ...) over both towers' maps
conv4  (384, 192, 3, 3), g=2   group t
conv5  (256, 192, 3, 3), g=2   group t
fc6    (4096, 9216)            outputs [2048t, ...); inputs from C,H,W to our
                               H,W,C flatten of both towers' pool5
fc7    (4096, 4096)            outputs [2048t, ...)
fc8    (1000, 4096)            classes [500t, 500t+500), in sorted-wnid order
=====  ======================  ============================================

Caffe's computation differs from the paper's in three places, which become
model and data fields of the checkpoint's config: LRN with ``k = 1`` and
``alpha / n``, over all channels of a layer across the towers
(``lrn_scope='layer'``); a 227x227 input with no padding; and at test time
the image warped to 256x256, centre 227 crop (offset 14), minus the mean:
Caffe's per-channel means, or the mean image given with ``--mean``.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import ml_collections
import numpy as np

from alexnet_jax import paths
from alexnet_jax.checkpoint import write_weights_only
from alexnet_jax.data.labels import imagenet_classes
from alexnet_jax.errors import CheckpointError, ConvertError
from alexnet_jax.model import LAYERS  # bvlc_alexnet's layers have our names

GROUPS = {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
# Caffe's layout of bvlc_alexnet: weights (out, in / groups, kh, kw) or (out, in), biases (out,).
CAFFE_SHAPES = {
    "conv1": (96, 3, 11, 11),
    "conv2": (256, 48, 5, 5),
    "conv3": (384, 256, 3, 3),
    "conv4": (384, 192, 3, 3),
    "conv5": (256, 192, 3, 3),
    "fc6": (4096, 9216),
    "fc7": (4096, 4096),
    "fc8": (1000, 4096),
}
POOL5_CHW = (256, 6, 6)
# models/bvlc_alexnet's test-time mean, per channel, BGR (Caffe's ilsvrc_2012_mean averaged over pixels).
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
RESIZE, CROP = 256, 227


# ---------------------------------------------------------------------------
# Reading: every source becomes {layer: (weights, bias)} in Caffe's layout


def _caffe_messages():
    """Caffe's NetParameter (V1 ``layers`` and current ``layer``) and BlobProto, built in code.

    Only the fields a weights file needs; everything else is skipped as unknown.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="alexnet_jax_caffe.proto", package="alexnet_jax_caffe", syntax="proto2"
    )

    def message(name, *fields):
        m = fdp.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".alexnet_jax_caffe.{type_name}"

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("BlobShape", ("dim", 1, F.TYPE_INT64, rep, None))
    message(
        "BlobProto",
        ("num", 1, F.TYPE_INT32, opt, None),
        ("channels", 2, F.TYPE_INT32, opt, None),
        ("height", 3, F.TYPE_INT32, opt, None),
        ("width", 4, F.TYPE_INT32, opt, None),
        ("data", 5, F.TYPE_FLOAT, rep, None),
        ("shape", 7, F.TYPE_MESSAGE, opt, "BlobShape"),
    )
    message(
        "V1LayerParameter",
        ("name", 4, F.TYPE_STRING, opt, None),
        ("type", 5, F.TYPE_INT32, opt, None),
        ("blobs", 6, F.TYPE_MESSAGE, rep, "BlobProto"),
    )
    message(
        "LayerParameter",
        ("name", 1, F.TYPE_STRING, opt, None),
        ("type", 2, F.TYPE_STRING, opt, None),
        ("blobs", 7, F.TYPE_MESSAGE, rep, "BlobProto"),
    )
    message(
        "NetParameter",
        ("name", 1, F.TYPE_STRING, opt, None),
        ("layers", 2, F.TYPE_MESSAGE, rep, "V1LayerParameter"),
        ("layer", 100, F.TYPE_MESSAGE, rep, "LayerParameter"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"alexnet_jax_caffe.{n}"))
    return get("NetParameter"), get("BlobProto")


def _blob_array(blob) -> np.ndarray:
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else (blob.num, blob.channels, blob.height, blob.width)
    data = np.asarray(blob.data, np.float32)
    if int(np.prod(shape)) != data.size:
        raise ConvertError(f"a blob says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _parse(message_class, raw: bytes, path, what: str):
    from google.protobuf.message import DecodeError

    msg = message_class()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ConvertError(
            f"{path}: not a readable {what} ({e}); the file may be truncated or of another kind."
        ) from None
    return msg


def read_caffemodel(path: str | Path) -> tuple[dict, str]:
    """A ``.caffemodel`` (V1 ``layers`` or upgraded ``layer``) -> ({layer: (weights, bias)}, 'V1' or 'V2')."""
    net_class, _ = _caffe_messages()
    net = _parse(net_class, Path(path).read_bytes(), path, "caffemodel (Caffe NetParameter)")
    version, layers = ("V2", net.layer) if len(net.layer) else ("V1", net.layers)
    found = {}
    for layer in layers:
        if layer.name in LAYERS:
            if len(layer.blobs) != 2:
                raise ConvertError(
                    f"{path}: layer {layer.name} has {len(layer.blobs)} blobs, expected 2 (weights and bias)"
                )
            w, b = (_blob_array(x) for x in layer.blobs)
            if layer.name.startswith("fc"):  # legacy blobs are 4-D: (1, 1, out, in) and (1, 1, 1, out)
                w = w.reshape(w.shape[-2:])
            found[layer.name] = (w, b.reshape(-1))
    if not found:
        raise ConvertError(
            f"{path}: no layers named {', '.join(LAYERS)}: not an AlexNet caffemodel ({len(layers)} layers read)."
        )
    return _complete(found, path), version


def read_npy(path: str | Path) -> dict:
    """The pickled ``bvlc_alexnet.npy`` dict ``{layer: [W, b]}`` (HWIO kernels, (in, out) FC weights with
    fc6's rows in H,W,C order, BGR input) -> Caffe's layout."""
    try:
        obj = np.load(path, allow_pickle=True, encoding="latin1")
        d = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ConvertError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}).") from None
    if not isinstance(d, dict):
        raise ConvertError(
            f"{path}: holds a {type(d).__name__}, not the dict {{layer: [weights, bias]}} of bvlc_alexnet.npy."
        )
    found = {}
    for name in LAYERS:
        if name not in d:
            continue
        try:
            w, b = (np.asarray(x, np.float32) for x in d[name])
        except (TypeError, ValueError):
            raise ConvertError(f"{path}: entry {name!r} is not a pair [weights, bias].") from None
        if name.startswith("conv") and w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif name == "fc6" and w.shape == (int(np.prod(POOL5_CHW)), 4096):
            w = w.reshape(6, 6, 256, -1).transpose(2, 0, 1, 3).reshape(9216, -1).T  # rows H,W,C -> columns C,H,W
        elif w.ndim == 2:
            w = w.T
        found[name] = (w, b.reshape(-1))
    return _complete(found, path)


def _complete(found: dict, path) -> dict:
    missing = [n for n in LAYERS if n not in found]
    if missing:
        raise ConvertError(f"{path}: no weights for {', '.join(missing)}; an AlexNet file has {', '.join(LAYERS)}.")
    for name, (w, b) in found.items():
        if w.shape != CAFFE_SHAPES[name] or b.shape != (CAFFE_SHAPES[name][0],):
            raise ConvertError(
                f"{path}: layer {name} has weights {w.shape} and bias {b.shape}; bvlc_alexnet's are "
                f"{CAFFE_SHAPES[name]} and ({CAFFE_SHAPES[name][0]},) (Caffe's layout: out, in/groups, "
                "kh, kw). Not the two-group AlexNet."
            )
    return found


def read_mean(path: str | Path) -> np.ndarray:
    """A ``.binaryproto`` (BlobProto, 1x3xHxW BGR) or ``.npy`` mean (3xHxW or 3 values, BGR) -> BGR ``(3, H, W)``
    or ``(3,)``."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            mean = np.asarray(np.load(path), np.float32)
        except (OSError, ValueError) as e:
            raise ConvertError(f"{path}: not a readable .npy mean ({e}).") from None
    else:
        _, blob_class = _caffe_messages()
        mean = _blob_array(_parse(blob_class, path.read_bytes(), path, "mean .binaryproto (Caffe BlobProto)"))
        mean = mean.reshape(mean.shape[-3:]) if mean.ndim == 4 else mean
    if mean.shape != (3,) and not (mean.ndim == 3 and mean.shape[0] == 3 and min(mean.shape[1:]) >= CROP):
        raise ConvertError(
            f"{path}: a mean of shape {mean.shape}; expected 3 channel means or a 3xHxW image "
            f"(H, W >= {CROP}), BGR as Caffe's."
        )
    return mean


# ---------------------------------------------------------------------------
# Caffe's groups -> our towers


def to_towers(caffe: dict) -> dict:
    """{layer: (weights, bias)} in Caffe's layout -> our ``{'towers': {layer: {kernel, bias}}}``, tower axis first."""
    towers = {}
    for name in LAYERS:
        w, b = caffe[name]
        if name.startswith("conv"):
            k = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO; a group's inputs are its own tower's maps
            if name == "conv1":
                k = k[:, :, ::-1, :]  # BGR -> RGB input channels
        else:
            k = w.T  # (in, out)
            if name == "fc6":  # inputs: Caffe's C,H,W flatten -> our H,W,C flatten (channels: tower 0's first)
                k = k.reshape(*POOL5_CHW, -1).transpose(1, 2, 0, 3).reshape(k.shape)
        split = lambda a: np.stack(np.split(np.ascontiguousarray(a), 2, axis=-1))  # outputs [0, n/2) -> tower 0
        towers[name] = {"kernel": split(k), "bias": split(b)}
    return {"towers": towers}


def mean_image_rgb(mean_bgr: np.ndarray | None) -> np.ndarray:
    """The mean our pipeline subtracts: an RGB ``(256, 256, 3)`` image (Caffe's channel means by default)."""
    mean_bgr = np.asarray(CAFFE_MEAN_BGR if mean_bgr is None else mean_bgr, np.float32)
    if mean_bgr.shape == (3,):
        return np.broadcast_to(mean_bgr[::-1], (RESIZE, RESIZE, 3)).astype(np.float32)
    if mean_bgr.shape[1:] != (RESIZE, RESIZE):
        raise ConvertError(
            f"a mean image of {mean_bgr.shape[1]}x{mean_bgr.shape[2]}; Caffe's test-time images "
            f"are {RESIZE}x{RESIZE} (give its ilsvrc_2012_mean, or none for the channel means)."
        )
    return np.ascontiguousarray(mean_bgr.transpose(1, 2, 0)[..., ::-1])


def caffe_config() -> ml_collections.ConfigDict:
    """``configs/paper.py`` with Caffe's computation and test-time preprocessing."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "configs" / "paper.py"
    if not path.is_file():
        raise ConvertError(f"{path} not found: run the converter from the repository checkout.")
    spec = importlib.util.spec_from_file_location("_paper_config", path)
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    c = paper.get_config()
    c.model.image_size = CROP  # 227x227 input, conv1 without padding (55x55 out)
    c.model.lrn_convention = "alpha_over_n"
    c.model.lrn_k = 1.0
    c.model.lrn_scope = "layer"  # Caffe's LRN spans both groups' maps
    c.data.resize_mode = "warp"  # the whole image to 256x256
    c.data.resize_size, c.data.crop_size = RESIZE, CROP  # centre crop at (256 - 227) // 2 = 14
    c.data.mean_subtraction = True
    c.data.format = "folder"
    c.eval_ten_crop = False  # the published 57.1% top-1 is the centre crop
    return c


# ---------------------------------------------------------------------------
# Writing


def convert(caffe: dict, out: str | Path, *, mean_bgr: np.ndarray | None = None, origin: dict) -> Path:
    """Write the checkpoint folder ``out`` (weights only, step 0); returns its step folder."""
    params = to_towers(caffe)
    classes, names = imagenet_classes()
    mean = mean_image_rgb(mean_bgr)
    config = caffe_config()
    origin = {
        **origin,
        "input": "RGB, 0..255 (conv1's input channels reversed from Caffe's BGR)",
        "mean": "Caffe's per-channel BGR means"
        if mean_bgr is None or np.shape(mean_bgr) == (3,)
        else "the given mean image",
        "resize": f"warp to {RESIZE}x{RESIZE}",
        "crop": f"{CROP}, centre at 14",
    }
    try:
        return write_weights_only(
            out,
            0,
            params,
            config=json.loads(config.to_json()),
            origin=origin,
            dataset={"classes": classes, "class_names": names},
            stats={"mean_image": mean},
        )
    except CheckpointError as e:
        raise ConvertError(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    """``python -m alexnet_jax.convert ARGS`` (and ``alexnet-convert``); ``argv`` defaults to ``sys.argv[1:]``."""
    from alexnet_jax import cli

    prog = cli.program("convert")
    argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    cli.run_main(prog, lambda: _main(prog, argv))


def _main(prog: str, argv: list[str]) -> None:
    from absl import flags

    from alexnet_jax import cli

    fv = flags.FlagValues()
    paths.DEFINE_path("caffemodel", None, "bvlc_alexnet.caffemodel (V1 or upgraded).", flag_values=fv)
    paths.DEFINE_path("npy", None, "bvlc_alexnet.npy (pickled {layer: [W, b]}).", flag_values=fv)
    paths.DEFINE_path(
        "torchvision", None, "torchvision's alexnet state_dict (.pth; needs torch installed).", flag_values=fv
    )
    paths.DEFINE_path("out", None, "The checkpoint folder to write (new or empty).", flag_values=fv)
    paths.DEFINE_path(
        "mean",
        None,
        "Mean image: Caffe's .binaryproto or a .npy (3xHxW or 3 values, BGR); default: Caffe's per-channel means.",
        flag_values=fv,
    )
    if cli.wants_help(argv):
        cli.print_help(
            prog,
            "\n\n".join(__doc__.split("\n\n")[:3]),
            fv,
            "Give one of --caffemodel, --npy and --torchvision, and --out.",
        )
    cli.parse_flags(prog, fv, argv)
    given = [n for n in ("caffemodel", "npy", "torchvision") if fv[n].value is not None]
    if len(given) != 1:
        cli.usage_error(
            prog,
            "give one of --caffemodel, --npy and --torchvision"
            + (f", not {' and '.join('--' + n for n in given)}" if given else ""),
        )
    cli.require(prog, fv, "out")
    a = fv
    try:
        source = Path(a.caffemodel or a.npy or a.torchvision)
        if not source.is_file():
            raise ConvertError(f"No file at {source}.")
        if a.torchvision:
            if a.mean:
                raise ConvertError("--mean is Caffe's; torchvision's normalisation is built in.")
            from alexnet_jax import convert_torchvision

            step_dir, origin = convert_torchvision.convert(source, a.out), {"format": "torchvision state_dict"}
        else:
            if a.caffemodel:
                caffe, version = read_caffemodel(source)
                origin = {"source": str(source.resolve()), "format": f"caffemodel {version}"}
            else:
                caffe, origin = read_npy(source), {"source": str(source.resolve()), "format": "npy"}
            mean = None
            if a.mean:
                if not Path(a.mean).is_file():
                    raise ConvertError(f"No mean file at {a.mean}.")
                mean = read_mean(a.mean)
            step_dir = convert(caffe, a.out, mean_bgr=mean, origin=origin)
    except ConvertError as e:
        sys.exit(f"{prog}: {e}")
    print(
        f"Wrote {step_dir} ({origin['format']}): load it with alexnet_jax.load_checkpoint({str(a.out)!r}), "
        f"or evaluate it with python -m alexnet_jax.evaluate --checkpoint={a.out} --data=DIR"
    )


if __name__ == "__main__":
    main()
