"""tfds data sets as text sources, on a tiny data set built here as ArrayRecord (offline, no TensorFlow)."""

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from longctx.data import tfds_source
from longctx.data.sources import open_source
from longctx.data.tfds_source import TfdsSource

TRAIN = [f"train document {i}: café" for i in range(6)]
VALIDATION = [f"validation document {i}" for i in range(3)]


class LongctxTinyText(tfds.core.GeneratorBasedBuilder):
    """Six train and three validation examples: a `text` feature and an `ids` (int sequence) feature."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file to look for; tfds's own lookup needs `importlib_resources` for a class defined in a test.
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "ids": tfds.features.Sequence(tfds.features.Scalar(np.int32))}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN), "validation": self._generate_examples(VALIDATION)}

    def _generate_examples(self, texts):
        for i, text in enumerate(texts):
            yield i, {"text": text, "ids": list(range(i + 1))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tfds"))
    LongctxTinyText(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


def texts(source):
    return [source[i] for i in range(len(source))]


def test_train_and_valid_splits(data_dir):
    train = open_source("tfds:longctx_tiny_text", "train", tfds_data_dir=data_dir)
    valid = open_source("tfds:longctx_tiny_text:1.0.0", "valid", tfds_data_dir=data_dir)
    assert isinstance(train, TfdsSource) and not train.tokenized and train.lengths() is None
    assert sorted(texts(train)) == sorted(TRAIN) and sorted(texts(valid)) == sorted(VALIDATION)
    assert train.key(0) == "longctx_tiny_text/train:0" and valid.key(2) == "longctx_tiny_text:1.0.0/validation:2"
    sliced = open_source("tfds:longctx_tiny_text", "valid", tfds_data_dir=data_dir, tfds_valid_split="train[:2]")
    assert len(sliced) == 2 and set(texts(sliced)) <= set(TRAIN)


def test_a_data_set_not_prepared_is_not_downloaded(data_dir, tmp_path):
    for name in ("no_such_data_set", "longctx_tiny_text"):  # Unknown anywhere; registered but not built there.
        with pytest.raises(FileNotFoundError, match=rf"data.source: tfds data set '{name}' is not prepared in "
                                                    rf"data.tfds_data_dir='.*'; .*tfds build {name}"):
            open_source(f"tfds:{name}", "train", tfds_data_dir=str(tmp_path))


def test_missing_or_non_text_feature(data_dir):
    with pytest.raises(ValueError, match=r"data.text_field: .* has no feature 'body'; its features are "
                                         r"\['ids', 'text'\]"):
        open_source("tfds:longctx_tiny_text", "train", tfds_data_dir=data_dir, text_field="body")
    with pytest.raises(ValueError, match="data.text_field: feature 'ids' .* not text"):
        open_source("tfds:longctx_tiny_text", "train", tfds_data_dir=data_dir, text_field="ids")


def test_unknown_split(data_dir):
    with pytest.raises(ValueError, match="data.tfds_valid_split: 'test' is not a split of .* train, validation"):
        open_source("tfds:longctx_tiny_text", "valid", tfds_data_dir=data_dir, tfds_valid_split="test")


def test_tfrecord_without_tensorflow_says_how_to_fix_it(data_dir, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    info_path = copy / "longctx_tiny_text" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    monkeypatch.setattr(tfds_source, "tensorflow_installed", lambda: False)
    with pytest.raises(ValueError, match=r"stored as tfrecord, .* rebuild it with `tfds build longctx_tiny_text "
                                         r"--file_format=array_record` or install longctx\[tfds\]"):
        open_source("tfds:longctx_tiny_text", "train", tfds_data_dir=str(copy))
