"""A TFDS-prepared ``imagenet2012`` (TFRecord files of ``tf.train.Example``) as the ImageNet folder layout.

    pip install tensorflow tensorflow-datasets
    python scripts/tfds_to_folder.py --data-dir ~/tensorflow_datasets --out /data/imagenet

TFDS keeps each image's original JPEG bytes, so they are written as they are (no decoding):
``OUT/train/<wnid>/<file name>`` and ``OUT/val/<wnid>/<file name>``; ``prepare`` or training then reads
the folder. Already-written files are skipped, so a stopped conversion continues. Needs TensorFlow:
reading TFRecords of ``tf.train.Example`` without it would take a protobuf reader this project does not carry.
"""

from __future__ import annotations

import argparse
import os
import sys


def convert(data_dir: str, out: str, tfds=None) -> dict[str, int]:
    """Write every train and validation image of TFDS's imagenet2012 under ``out``; ``{split: images}``."""
    if tfds is None:
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            sys.exit("tfds_to_folder: needs TensorFlow Datasets: pip install tensorflow tensorflow-datasets")
    builder = tfds.builder("imagenet2012", data_dir=os.path.expanduser(data_dir))
    wnid = builder.info.features["label"].int2str
    written = {}
    for split, ours in (("train", "train"), ("validation", "val")):
        dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        n = 0
        for example in tfds.as_numpy(dataset):
            folder = os.path.join(out, ours, wnid(int(example["label"])))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, os.path.basename(example["file_name"].decode()))
            if not os.path.exists(path):
                with open(path + ".tmp", "wb") as f:
                    f.write(example["image"])
                os.replace(path + ".tmp", path)
            n += 1
        written[ours] = n
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="~/tensorflow_datasets", help="TFDS's data_dir")
    parser.add_argument("--out", required=True, help="the folder to write (ImageNet layout)")
    a = parser.parse_args(argv)
    for split, n in convert(a.data_dir, os.path.abspath(os.path.expanduser(a.out))).items():
        print(f"{split}: {n} images")


if __name__ == "__main__":
    main()
