"""scripts/tfds_to_folder.py against a stand-in for tensorflow_datasets (TensorFlow is not installed here)
that serves real JPEG bytes as TFDS's imagenet2012 does: the folder it writes is one prepare reads, with
the files' bytes unchanged and every image under its wnid."""

import sys
import types
from pathlib import Path

import numpy as np
from _folders import WNIDS, write_imagenet_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tfds_to_folder

from alexnet_jax.data import layout
from alexnet_jax.data.labels import imagenet_classes


def fake_tfds(examples: dict):
    """The few calls the script makes: builder(...).info / as_dataset, decode.SkipDecoding, as_numpy."""
    wnids = imagenet_classes()[0]
    label = types.SimpleNamespace(int2str=lambda i: wnids[i])
    builder = types.SimpleNamespace(
        info=types.SimpleNamespace(features={"label": label}), as_dataset=lambda split, decoders: examples[split]
    )
    return types.SimpleNamespace(
        builder=lambda name, data_dir: builder,
        as_numpy=lambda ds: iter(ds),
        decode=types.SimpleNamespace(SkipDecoding=lambda: None),
    )


def test_the_folder_it_writes_is_the_original(tmp_path, monkeypatch, capsys):
    src = write_imagenet_folder(tmp_path / "src", per_class=2, val_per_class=1)
    wnids = imagenet_classes()[0]
    examples = {}
    for split, theirs in (("train", "train"), ("val", "validation")):
        files = layout.scan_split(src, split)
        examples[theirs] = [
            {
                "image": (src / split / rel).read_bytes(),
                "label": np.int64(wnids.index(WNIDS[lab])),
                "file_name": rel.split("/")[-1].encode(),
            }
            for rel, lab in zip(files.rel_paths, files.labels)
        ]
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(examples))
    tfds_to_folder.main(["--data-dir", "~/tensorflow_datasets", "--out", str(out)])
    assert capsys.readouterr().out.split() == ["train:", "8", "images", "val:", "4", "images"]
    for split in ("train", "val"):
        a, b = layout.scan_split(src, split), layout.scan_split(out, split)
        assert a.rel_paths == b.rel_paths and list(a.labels) == list(b.labels)
        assert all((src / split / r).read_bytes() == (out / split / r).read_bytes() for r in a.rel_paths)
