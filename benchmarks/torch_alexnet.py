"""The same AlexNet in PyTorch, as a speed reference for ``bench_train.py`` (PyTorch is optional).

Two towers as grouped convolutions (``groups=2`` where a layer sees only its own
tower: conv2, conv4, conv5); LRN within each tower with the paper's alpha;
conv1 padded at the bottom/right as cuda-convnet did. ``load_from_jax`` copies
our parameters in, so the benchmark can check the two give the same logits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Per-tower widths (conv1..conv5, fc6, fc7) of the paper's nets (Section 3.5, footnote 2).
_WIDTHS = {2: (48, 128, 192, 192, 128, 2048, 2048), 1: (48, 128, 192, 192, 256, 4096, 4096)}


def _conv1_padding(size: int) -> int:  # cuda-convnet's rounding: 224 -> 55x55
    out = -(-(size - 11) // 4) + 1
    return (out - 1) * 4 + 11 - size


class TorchAlexNet(nn.Module):
    def __init__(
        self,
        towers: int = 2,
        num_classes: int = 1000,
        width: float = 1.0,
        image_size: int = 224,
        lrn_alpha: float = 1e-4,
    ):
        super().__init__()
        w = dict(
            zip(
                ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"),
                (max(1, round(c * width)) for c in _WIDTHS[towers]),
            )
        )
        T = towers
        self.towers, self.pad = T, _conv1_padding(image_size)
        self.conv1 = nn.Conv2d(3, T * w["conv1"], 11, stride=4)
        self.conv2 = nn.Conv2d(T * w["conv1"], T * w["conv2"], 5, padding=2, groups=T)
        self.conv3 = nn.Conv2d(T * w["conv2"], T * w["conv3"], 3, padding=1)
        self.conv4 = nn.Conv2d(T * w["conv3"], T * w["conv4"], 3, padding=1, groups=T)
        self.conv5 = nn.Conv2d(T * w["conv4"], T * w["conv5"], 3, padding=1, groups=T)
        size = (image_size + self.pad - 11) // 4 + 1
        for _ in range(3):
            size = (size - 3) // 2 + 1
        self.fc6 = nn.Linear(T * w["conv5"] * size * size, T * w["fc6"])
        self.fc7 = nn.Linear(T * w["fc6"], T * w["fc7"])
        self.fc8 = nn.Linear(T * w["fc7"], num_classes)
        # torch divides alpha by n; the paper's formula does not.
        self.lrn = nn.LocalResponseNorm(5, alpha=lrn_alpha * 5, beta=0.75, k=2.0)
        self.dropout = nn.Dropout(0.5)

    def _lrn_per_tower(self, x):
        return torch.cat([self.lrn(t) for t in x.chunk(self.towers, dim=1)], dim=1)

    def forward(self, x_NCHW):
        x = F.pad(x_NCHW, (0, self.pad, 0, self.pad))
        x = F.max_pool2d(self._lrn_per_tower(F.relu(self.conv1(x))), 3, 2)
        x = F.max_pool2d(self._lrn_per_tower(F.relu(self.conv2(x))), 3, 2)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.max_pool2d(F.relu(self.conv5(x)), 3, 2)
        x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC order, as our fc6 kernel reads it
        x = self.dropout(F.relu(self.fc6(x)))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)


def load_from_jax(net: TorchAlexNet, params: dict) -> None:
    """Copy our tower-stacked parameters in: towers side by side along the output channels.

    That one rule serves every layer: a grouped conv's group t reads tower t's
    inputs, and conv3/fc layers read the exchanged (concatenated) activations,
    which fc6 flattens in NHWC order, as ``forward`` does.
    """
    for name, p in params["towers"].items():
        k = np.concatenate(list(np.asarray(p["kernel"], np.float32)), axis=-1)  # (..., I, T*O)
        layer = getattr(net, name)
        w = k.transpose(3, 2, 0, 1) if k.ndim == 4 else k.T  # OIHW or (O, I)
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(w))
        layer.bias.data = torch.from_numpy(np.asarray(p["bias"], np.float32).reshape(-1).copy())
