"""torchvision's AlexNet weights: ``python -m alexnet_jax.convert --torchvision FILE.pth`` against PyTorch.

The reference is a PyTorch module written here with torchvision's module
structure (``features``, ``avgpool``, ``classifier``; so its ``state_dict`` has
torchvision's keys), random weights, saved as a ``.pth`` the converter reads as
a user's file. Both nets see the same crop: PyTorch its normalised tensor
``(x / 255 - mean) / std`` (NCHW), ours the converted checkpoint's input.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

torch = pytest.importorskip("torch")  # a test extra; never imported by the package except by the converter
from torch import nn  # noqa: E402

from alexnet_jax import Classifier, apply_on_mesh, load_checkpoint, make_mesh  # noqa: E402
from alexnet_jax.checkpoint import read  # noqa: E402
from alexnet_jax.convert_torchvision import MEAN_RGB, STD_RGB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FC8_GAIN = 1.0


class TorchvisionAlexNet(nn.Module):
    """The layer structure of torchvision.models.alexnet (keys features.{0,3,6,8,10}, classifier.{1,4,6})."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, 1000),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def torch_probs(net, crops_NHWC_uint8):
    x = torch.from_numpy(np.ascontiguousarray(crops_NHWC_uint8.transpose(0, 3, 1, 2))).float() / 255
    x = (x - torch.tensor(MEAN_RGB)[:, None, None]) / torch.tensor(STD_RGB)[:, None, None]
    with torch.no_grad():
        return torch.softmax(net.eval()(x).double(), dim=-1).numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchvision")
    torch.manual_seed(0)
    net = TorchvisionAlexNet()
    with torch.no_grad():  # PyTorch's default init shrinks activations layer by layer: keep their scale,
        for layer in [*net.features, *net.classifier]:  # so that the probabilities say something
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.mul_(2.45)  # sqrt(6): the ReLU gain over the uniform init's 1/sqrt(3)
        net.classifier[6].weight.mul_(FC8_GAIN)
    torch.save(net.state_dict(), d / "alexnet.pth")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.convert",
            "--torchvision",
            str(d / "alexnet.pth"),
            "--out",
            str(d / "ckpt"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(256, 256), (300, 256), (256, 320)]):  # shorter side 256: no resampling
        small = rng.integers(0, 256, (h // 16, w // 16, 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        images.append(d / f"img{i}.png")
        img.save(images[-1])
    return net, d / "ckpt", images


def test_converted_weights_give_pytorchs_probabilities(converted):
    net, ckpt, images = converted
    clf = Classifier(load_checkpoint(ckpt, devices=jax.devices()[:1]), views="center")
    crops = clf.preprocess(images)["image"][:, 0]  # (N, 224, 224, 3) uint8
    for crop, path in zip(crops, images):  # torchvision's Resize(256) + CenterCrop(224): the same pixels
        arr = np.asarray(Image.open(path).convert("RGB"))
        top, left = round((arr.shape[0] - 224) / 2), round((arr.shape[1] - 224) / 2)
        np.testing.assert_array_equal(crop, arr[top : top + 224, left : left + 224])
    want = torch_probs(net, crops)
    got = clf.predict(images, top_k=5).probs
    assert want.max(axis=1).min() > 0.02, "near-uniform probabilities would compare nothing"
    err = np.abs(got - want).max()
    print(f"max |p - p_torch| = {err:.1e}, max p = {want.max():.3f}")
    assert err < 2e-5
    assert (np.argsort(-got, axis=1)[:, :5] == np.argsort(-want, axis=1)[:, :5]).all()


def test_checkpoint_is_the_owt_net_and_records_torchvisions_preprocessing(converted):
    _, ckpt, _ = converted
    c = load_checkpoint(ckpt, devices=jax.devices()[:1])
    m = c.config.model
    assert (m.towers, tuple(m.conv_widths), m.lrn, m.conv1_pad, m.image_size) == (
        1,
        (64, 192, 384, 256, 256),
        False,
        2,
        224,
    )
    assert (c.config.data.resize_mode, c.config.data.resize_size, c.config.data.crop_size) == ("shorter_side", 256, 224)
    np.testing.assert_allclose(c.stats["mean_image"][0, 0], 255 * np.asarray(MEAN_RGB), rtol=1e-6)
    origin = read(epath.Path(c.path), "origin")["origin"]
    assert origin["normalize"] == {"mean": list(MEAN_RGB), "std": list(STD_RGB), "of": "x / 255"}
    assert "conv1" in origin["folded"]
    assert json.loads(json.dumps(origin))["format"] == "torchvision alexnet state_dict"


def test_converted_net_runs_in_every_layout(converted):
    """The same logits on one device and on 4 devices in the towers (one tower: data-parallel),
    data and hybrid (FC units split 4 ways) layouts."""
    _, ckpt, images = converted
    c = load_checkpoint(ckpt, devices=jax.devices()[:1])
    x = Classifier(c, views="center").model_inputs(images[:1] * 4)[:, 0]
    want = np.asarray(jax.jit(lambda p: c.model.apply({"params": p}, x))(c.params))
    mesh = make_mesh(towers=1, data=4, devices=jax.devices()[:4])
    for layout in ("towers", "data", "hybrid"):
        got = np.asarray(apply_on_mesh(c.model, {"params": jax.device_get(c.params)}, x, mesh, layout=layout))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), layout


@pytest.mark.slow  # two converter processes importing torch
def test_bad_state_dicts_get_one_line_errors(tmp_path):
    net = TorchvisionAlexNet()
    state = net.state_dict()
    del state["classifier.6.weight"]
    torch.save(state, tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    for name, message in (
        ("partial.pth", "no classifier.6.weight/.bias (fc8)"),
        ("junk.pth", "not a readable PyTorch state_dict"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "alexnet_jax.convert",
                "--torchvision",
                str(tmp_path / name),
                "--out",
                str(tmp_path / f"out_{name}"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
