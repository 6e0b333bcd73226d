"""Caffe's bvlc_alexnet imported: the converted checkpoint computes what Caffe computes.

No download: the test writes random-weight models with bvlc_alexnet's real layer names and shapes, as a
V1 and an upgraded (V2) caffemodel, byte by byte with its own protobuf wire encoder, and as the pickled
bvlc_alexnet.npy. The reference is an independent float64 NumPy forward pass of Caffe's computation:
BGR input minus the mean, grouped convolutions in Caffe's (out, in, kh, kw) layout, LRN over every
channel of the layer with k = 1 and alpha / n, ceil-mode max pooling, fc6 reading pool5 in C,H,W order,
and caffe.io.oversample's ten views (corners and centre, then mirrored) with the softmax averaged.
"""

import functools
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import Classifier, load_checkpoint
from alexnet_jax.convert import CAFFE_MEAN_BGR, CAFFE_SHAPES, LAYERS

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Random weights in Caffe's layout, scaled so that every layer (LRN included) matters


@functools.lru_cache(maxsize=1)
def caffe_weights(seed=0):
    """Read-only: shared by the tests."""
    rng = np.random.default_rng(seed)
    w = {}
    for name in LAYERS:
        shape = CAFFE_SHAPES[name]
        fan_in = int(np.prod(shape[1:]))
        w[name] = [
            rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32),
            rng.normal(0, 0.5, shape[0]).astype(np.float32),
        ]
    w["fc8"][0] *= 0.02  # logits of a few units: probabilities far from one-hot, so every mistake shows
    for a in (x for pair in w.values() for x in pair):
        a.flags.writeable = False
    return w


# ---------------------------------------------------------------------------
# Writing the three file forms (our own encoder: independent of the converter's protobuf reader)


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, wire, payload):
    key = varint(number << 3 | wire)
    return key + (varint(payload) if wire == 0 else varint(len(payload)) + payload)


def blob(array, legacy):
    data = field(5, 2, np.asarray(array, "<f4").tobytes())  # packed floats
    if legacy:  # V1: num, channels, height, width; FC weights as (1, 1, out, in), biases (1, 1, 1, out)
        dims = (1,) * (4 - array.ndim) + array.shape
        return b"".join(field(i + 1, 0, d) for i, d in enumerate(dims)) + data
    shape = field(1, 2, b"".join(varint(d) for d in array.shape))  # BlobShape.dim, packed
    return data + field(7, 2, shape)


V1_TYPES = {"conv": 4, "fc": 14, "relu": 18, "norm": 15, "pool": 17}


@functools.lru_cache(maxsize=4)
def v1_file(seed=0):
    return caffemodel(caffe_weights(seed), version=1)


def caffemodel(weights, version):
    layers = []
    for name in (
        "data",
        "conv1",
        "relu1",
        "norm1",
        "pool1",
        "conv2",
        "relu2",
        "norm2",
        "pool2",
        "conv3",
        "relu3",
        "conv4",
        "relu4",
        "conv5",
        "relu5",
        "pool5",
        "fc6",
        "relu6",
        "drop6",
        "fc7",
        "relu7",
        "drop7",
        "fc8",
        "prob",
    ):
        blobs = [blob(a, version == 1) for a in weights[name]] if name in weights else []
        kind = next((v for k, v in V1_TYPES.items() if name.startswith(k)), 5)
        if version == 1:
            layers.append(
                field(2, 2, field(4, 2, name.encode()) + field(5, 0, kind) + b"".join(field(6, 2, b) for b in blobs))
            )
        else:
            type_name = {4: "Convolution", 14: "InnerProduct", 18: "ReLU", 15: "LRN", 17: "Pooling"}.get(kind, "Data")
            layers.append(
                field(
                    100,
                    2,
                    field(1, 2, name.encode())
                    + field(2, 2, type_name.encode())
                    + b"".join(field(7, 2, b) for b in blobs),
                )
            )
    return field(1, 2, b"CaffeNet") + b"".join(layers)


def npy_form(weights):
    """bvlc_alexnet.npy's layout: HWIO kernels, (in, out) FC weights, fc6's rows in H,W,C order."""
    d = {}
    for name, (w, b) in weights.items():
        if name.startswith("conv"):
            w = w.transpose(2, 3, 1, 0)
        elif name == "fc6":
            w = w.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(9216, 4096)
        else:
            w = w.T
        d[name] = [w, b]
    return d


def binaryproto(mean_CHW):
    return blob(mean_CHW[None], legacy=True)


# ---------------------------------------------------------------------------
# Caffe's computation in float64 NumPy


def conv(x_NHWC, w_OIHW, b, stride=1, pad=0, groups=1):
    x = np.pad(x_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh = w_OIHW.shape[2]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kh), axis=(1, 2))[:, ::stride, ::stride]  # N,H,W,C,kh,kw
    outs = []
    for _g, (wg, xg) in enumerate(zip(np.split(w_OIHW, groups), np.split(win, groups, axis=3))):
        outs.append(np.tensordot(xg, wg, axes=([3, 4, 5], [1, 2, 3])))
    return np.concatenate(outs, -1) + b


def lrn_caffe(x, n=5, alpha=1e-4, beta=0.75, k=1.0):
    sq = np.pad(x**2, ((0, 0), (0, 0), (0, 0), (n // 2, n // 2)))
    window = sum(sq[..., i : i + x.shape[-1]] for i in range(n))
    return x / (k + alpha / n * window) ** beta


def max_pool_ceil(x, size=3, stride=2):
    h = x.shape[1]
    out = -(-(h - size) // stride) + 1
    extra = (out - 1) * stride + size - h
    x = np.pad(x, ((0, 0), (0, extra), (0, extra), (0, 0)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    return win.max(axis=(-1, -2))


def caffe_forward(w, x_bgr):
    """Logits of BGR, mean-subtracted float64 crops (N, 227, 227, 3)."""
    relu = lambda a: np.maximum(a, 0)
    p = {k: (np.float64(a), np.float64(b)) for k, (a, b) in w.items()}
    x = max_pool_ceil(lrn_caffe(relu(conv(x_bgr, *p["conv1"], stride=4))))
    x = max_pool_ceil(lrn_caffe(relu(conv(x, *p["conv2"], pad=2, groups=2))))
    x = relu(conv(x, *p["conv3"], pad=1))
    x = relu(conv(x, *p["conv4"], pad=1, groups=2))
    x = max_pool_ceil(relu(conv(x, *p["conv5"], pad=1, groups=2)))
    x = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # Caffe's blobs are N,C,H,W
    x = relu(x @ p["fc6"][0].T + p["fc6"][1])
    x = relu(x @ p["fc7"][0].T + p["fc7"][1])
    return x @ p["fc8"][0].T + p["fc8"][1]


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def caffe_probs(w, paths, views, mean_bgr_CHW=None):
    """Caffe's test time: warp to 256x256, BGR minus the mean, centre crop or oversample's ten views."""
    out = []
    for path in paths:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR), np.float64)
        mean = np.asarray(CAFFE_MEAN_BGR) if mean_bgr_CHW is None else mean_bgr_CHW.transpose(1, 2, 0)
        bgr = rgb[..., ::-1] - mean
        if views == "center":
            crops = [bgr[14:241, 14:241]]
        else:
            corners = [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]
            crops = [bgr[y : y + 227, x : x + 227] for y, x in corners]
            crops += [c[:, ::-1] for c in crops]
        out.append(softmax(caffe_forward(w, np.stack(crops))).mean(0))
    return np.stack(out)


# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of three shapes: wide, tall and a square 256x256 JPEG (the fast JPEG path)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(240, 320), (300, 220), (256, 256)]):
        yy, xx = np.mgrid[:h, :w]
        img = np.stack([128 + 100 * np.sin(xx / (9 + 3 * i) + c) * np.cos(yy / 13) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
        p = d / (f"img{i}.jpg" if (h, w) == (256, 256) else f"img{i}.png")
        Image.fromarray(img).save(p, **({"quality": 92} if p.suffix == ".jpg" else {}))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The random net written as a V1 caffemodel and converted through the command line."""
    d = tmp_path_factory.mktemp("caffe")
    w = caffe_weights()
    (d / "bvlc_alexnet.caffemodel").write_bytes(v1_file())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.convert",
            "--caffemodel",
            str(d / "bvlc_alexnet.caffemodel"),
            "--out",
            str(d / "ckpt"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "caffemodel V1" in r.stdout
    return w, d / "ckpt"


@pytest.mark.parametrize("views", ["center", "ten_crop"])
def test_converted_caffemodel_computes_caffes_probabilities(converted, images, views):
    w, ckpt_dir = converted
    want = caffe_probs(w, images, views)
    assert want.max() > 10 / 1000  # not a flat distribution: mistakes move the probabilities
    ckpt = load_checkpoint(ckpt_dir, devices=jax.devices()[:1])
    got = Classifier(ckpt, views=views).predict(images).probs
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    top5 = np.argsort(-want, 1)[:, :5]
    assert (np.argsort(-got, 1)[:, :5] == top5).all()


def test_on_the_two_device_tower_mesh_too(converted, images):
    w, ckpt_dir = converted
    ckpt = load_checkpoint(ckpt_dir, devices=jax.devices()[:2])
    assert ckpt.mesh is not None and dict(ckpt.mesh.shape) == {"data": 1, "tower": 2}
    got = Classifier(ckpt, views="center").predict(images).probs
    assert np.abs(got - caffe_probs(w, images, "center")).max() <= 1e-4


def test_checkpoint_carries_classes_preprocessing_and_origin(converted):
    from alexnet_jax import checkpoint

    _, ckpt_dir = converted
    ckpt = load_checkpoint(ckpt_dir, devices=jax.devices()[:1])
    assert len(ckpt.classes) == 1000 and ckpt.classes == sorted(ckpt.classes)
    assert (ckpt.classes[0], ckpt.class_names[0]) == ("n01440764", "tench")
    m, d = ckpt.config.model, ckpt.config.data
    assert (m.image_size, m.lrn_k, m.lrn_convention, m.lrn_scope) == (227, 1.0, "alpha_over_n", "layer")
    assert (d.resize_mode, d.resize_size, d.crop_size) == ("warp", 256, 227)
    np.testing.assert_allclose(ckpt.stats["mean_image"][100, 100], CAFFE_MEAN_BGR[::-1], rtol=1e-6)  # RGB
    origin = checkpoint.read(Path(ckpt.path), "origin")["origin"]
    assert origin["format"] == "caffemodel V1" and "BGR" in origin["input"]


@pytest.mark.slow  # two more 240 MB files written and parsed
def test_v2_caffemodel_and_npy_give_the_same_checkpoint(converted, tmp_path):
    from alexnet_jax import convert

    w, ckpt_dir = converted
    (tmp_path / "v2.caffemodel").write_bytes(caffemodel(w, version=2))
    np.save(tmp_path / "bvlc_alexnet.npy", npy_form(w), allow_pickle=True)
    v2, version = convert.read_caffemodel(tmp_path / "v2.caffemodel")
    assert version == "V2"
    reference = load_checkpoint(ckpt_dir, devices=jax.devices()[:1]).params
    for form in (v2, convert.read_npy(tmp_path / "bvlc_alexnet.npy")):
        got = convert.to_towers(form)
        for layer in LAYERS:
            for k in ("kernel", "bias"):
                np.testing.assert_array_equal(got["towers"][layer][k], np.asarray(reference["towers"][layer][k]))


@pytest.mark.slow  # another conversion and a ten-crop pass of the full-size net
def test_mean_image_from_binaryproto(converted, images, tmp_path):
    w, _ = converted
    rng = np.random.default_rng(3)
    mean = (np.asarray(CAFFE_MEAN_BGR)[:, None, None] + rng.normal(0, 20, (3, 256, 256))).astype(np.float32)
    (tmp_path / "w.caffemodel").write_bytes(caffemodel(w, version=2))
    (tmp_path / "mean.binaryproto").write_bytes(binaryproto(mean))
    from alexnet_jax import convert

    convert.main(
        [
            "--caffemodel",
            str(tmp_path / "w.caffemodel"),
            "--mean",
            str(tmp_path / "mean.binaryproto"),
            "--out",
            str(tmp_path / "ckpt"),
        ]
    )
    clf = Classifier(load_checkpoint(tmp_path / "ckpt", devices=jax.devices()[:1]), views="ten_crop")
    want = caffe_probs(w, images, "ten_crop", mean_bgr_CHW=mean.astype(np.float64))
    assert np.abs(clf.predict(images).probs - want).max() <= 1e-4


def convert_cli(*args) -> str:
    """``python -m alexnet_jax.convert ARGS`` in this process (its main); the one line it exits with."""
    from alexnet_jax import convert

    with pytest.raises(SystemExit) as e:
        convert.main([str(a) for a in args])
    assert isinstance(e.value.code, str), e.value.code  # a message, not a traceback
    return e.value.code


def test_bad_files_get_one_line_errors(tmp_path):
    w = caffe_weights()
    good = v1_file()
    wrong = {**w, "conv2": [np.zeros((256, 96, 5, 5), np.float32), w["conv2"][1]]}  # no groups: not AlexNet's
    cases = {
        "truncated.caffemodel": (good[: len(good) // 3], "not a readable caffemodel"),
        "notes.caffemodel": (b"these are not the weights you are looking for\n" * 20, "not a readable caffemodel"),
        "ungrouped.caffemodel": (caffemodel(wrong, version=2), "layer conv2 has weights (256, 96, 5, 5)"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        line = convert_cli("--caffemodel", tmp_path / name, "--out", tmp_path / f"out-{name}")
        assert message in line and "\n" not in line, (name, line)
        assert not (tmp_path / f"out-{name}").exists()
    np.save(tmp_path / "list.npy", np.arange(5))
    assert "not the dict {layer: [weights, bias]}" in convert_cli(
        "--npy", tmp_path / "list.npy", "--out", tmp_path / "o"
    )
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    assert "not a readable .npy" in convert_cli("--npy", tmp_path / "garbage.npy", "--out", tmp_path / "o")
    assert "No file at" in convert_cli("--npy", tmp_path / "missing.npy", "--out", tmp_path / "o")
    (tmp_path / "o2" / "checkpoints" / "0").mkdir(parents=True)  # an earlier conversion is never overwritten
    (tmp_path / "ok.caffemodel").write_bytes(good)
    assert "already holds checkpoints" in convert_cli(
        "--caffemodel", tmp_path / "ok.caffemodel", "--out", tmp_path / "o2"
    )


def val_folder(root, images, labels, classes):
    for path, label in zip(images, labels):
        d = root / "val" / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        (d / path.name).write_bytes(path.read_bytes())
    return root


def expected_errors(probs, labels):
    ranks = [int((p > p[y]).sum()) for p, y in zip(probs, labels)]  # classes scored above the true one
    return np.mean([r >= 1 for r in ranks]), np.mean([r >= 5 for r in ranks])


@pytest.mark.slow  # a command compiling the full-size net's eval step
@pytest.mark.heavy  # over a minute on 2 cores: .ci/run runs it when time allows
def test_evaluate_command_on_a_converted_checkpoint(converted, images, tmp_path):
    """Only 3 of the 1000 classes in the folder: labels still go through the checkpoint's class list."""
    import json

    from alexnet_jax.data.labels import imagenet_classes

    w, ckpt_dir = converted
    centre, ten = caffe_probs(w, images, "center"), caffe_probs(w, images, "ten_crop")
    order = np.argsort(-centre, 1)
    labels = [int(order[0, 0]), int(order[1, 2]), int(order[2, 50])]  # top-1 right; top-5 only; neither
    root = val_folder(tmp_path / "imagenet", images, labels, imagenet_classes()[0])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.evaluate",
            f"--checkpoint={ckpt_dir}",
            f"--data={root}",
            "--views=ten_crop",
            f"--json={tmp_path / 'val.json'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "val.json").read_text())
    assert got["images"] == 3 and "images/s" in r.stdout
    assert (got["top1_error"], got["top5_error"]) == pytest.approx(expected_errors(centre, labels))
    assert (got["top1_error"], got["top5_error"]) == pytest.approx((2 / 3, 1 / 3))
    assert (got["top1_error_ten_crop"], got["top5_error_ten_crop"]) == pytest.approx(expected_errors(ten, labels))


@pytest.mark.slow  # a command loading the full-size net
def test_evaluate_refuses_unknown_wnids(converted, images, tmp_path):
    _, ckpt_dir = converted
    root = tmp_path / "imagenet"
    (root / "val" / "n99999999").mkdir(parents=True)
    (root / "val" / "n99999999" / images[0].name).write_bytes(images[0].read_bytes())
    r = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.evaluate", f"--checkpoint={ckpt_dir}", f"--data={root}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    (line,) = [x for x in r.stderr.splitlines() if "alexnet_jax.evaluate:" in x]
    assert "holds no folder of the 1000 known classes; its folders n99999999 are class ids" in line, line


@pytest.mark.slow  # two commands loading the full-size net
def test_predict_command_prints_caffes_top5(converted, images, tmp_path):
    import json

    from alexnet_jax.data.labels import imagenet_classes

    w, ckpt_dir = converted
    want = caffe_probs(w, images, "center")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.predict",
            "--checkpoint",
            str(ckpt_dir),
            "--views",
            "center",
            "--json",
            str(tmp_path / "p.json"),
            *map(str, images),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "p.json").read_text())
    wnids, names = imagenet_classes()
    for path, p in zip(images, want):
        top = np.argsort(-p)[:5]
        assert [x["class"] for x in got[str(path)]] == [wnids[i] for i in top]
        assert [x["name"] for x in got[str(path)]] == [names[i] for i in top]
        np.testing.assert_allclose([x["prob"] for x in got[str(path)]], p[top], atol=1e-4)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.predict",
            "--checkpoint",
            str(ckpt_dir),
            str(images[0]),
            str(tmp_path / "nothing.jpg"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "nothing.jpg" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # another 240 MB file converted in a fresh process
def test_npy_command_line(converted, tmp_path):
    w, ckpt_dir = converted
    np.save(tmp_path / "bvlc_alexnet.npy", npy_form(w), allow_pickle=True)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.convert",
            "--npy",
            str(tmp_path / "bvlc_alexnet.npy"),
            "--out",
            str(tmp_path / "ckpt"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "(npy)" in r.stdout, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / "ckpt", devices=jax.devices()[:1]).params
    b = load_checkpoint(ckpt_dir, devices=jax.devices()[:1]).params
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
