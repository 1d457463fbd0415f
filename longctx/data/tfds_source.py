"""A tfds data set as a text `DocumentSource`: `data.source = "tfds:<name>[/<config>][:<version>]"`.

Random access goes through `tfds.data_source`, which reads the data set's ArrayRecord files and needs no TensorFlow.
The data set must already be prepared in `data.tfds_data_dir` (tfds's default directory when empty): nothing is
downloaded at run time. longctx's "train" split is the tfds split `data.tfds_train_split` and "valid" is
`data.tfds_valid_split`; either may be any tfds split string ("train[:1%]", "validation+test", ...).

Items are the text of feature `data.text_field` (a `tfds.features.Text` or a scalar string tensor), decoded strictly
as UTF-8. Integer features (token ids) are not read: their framing and tokenizer are unknown to longctx; write such a
corpus as an arrayrecord one instead. Unlike file sources, nothing is scanned at open time, so documents that are
only whitespace stay in. A data set stored as TFRecord is read whole into memory through `tfds.load` when TensorFlow
is installed (the `tfds` extra), with a warning; without TensorFlow it is an error.
"""

import importlib.util
import logging

import numpy as np
import tensorflow_datasets as tfds

from longctx.data.document_source import SPLITS, DocumentSource

logger = logging.getLogger("longctx.data")


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of `name` in `data_dir`; FileNotFoundError naming the config fields if it is not prepared there."""
    where = f"data.tfds_data_dir={data_dir!r}" if data_dir else "tfds's default data dir (data.tfds_data_dir is empty)"
    not_prepared = (f"data.source: tfds data set {name!r} is not prepared in {where}; longctx downloads nothing. "
                    f"Prepare it first: tfds build {name} --file_format=array_record"
                    + (f" --data_dir={data_dir}" if data_dir else ""))
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise FileNotFoundError(not_prepared) from error
    if not builder.is_prepared():
        raise FileNotFoundError(not_prepared)
    return builder


def _is_text(feature: tfds.features.FeatureConnector) -> bool:
    return isinstance(feature, tfds.features.Text) or (
        isinstance(feature, tfds.features.Tensor) and feature.shape == () and feature.np_dtype == np.object_)


class TfdsSource(DocumentSource):
    """One split of a prepared tfds data set; items are the `text_field` feature as `str` (see the module docstring).

    `name` is what `tfds.builder` accepts ("name", "name/config", "name:1.0.0"); `data_dir` "" means tfds's default.
    """

    tokenized = False

    def __init__(self, name: str, split: str, *, data_dir: str = "", text_field: str = "text",
                 train_split: str = "train", valid_split: str = "validation"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.name, self.split, self.text_field = name, split, text_field
        self.tfds_split = train_split if split == "train" else valid_split
        split_field = "data.tfds_train_split" if split == "train" else "data.tfds_valid_split"
        builder = _prepared_builder(name, data_dir)
        features = builder.info.features
        if text_field not in features:
            raise ValueError(f"data.text_field: tfds data set {name!r} has no feature {text_field!r}; its features "
                             f"are {sorted(features.keys())}")
        if not _is_text(features[text_field]):
            raise ValueError(f"data.text_field: feature {text_field!r} of tfds data set {name!r} is "
                             f"{features[text_field]!r}, not text; TfdsSource reads text features")
        try:
            self._examples = builder.as_data_source(split=self.tfds_split)
        except ValueError as error:  # tfds: "Unknown split ..." / "Error parsing split ...".
            raise ValueError(f"{split_field}: {self.tfds_split!r} is not a split of tfds data set {name!r} (it has "
                             f"{', '.join(builder.info.splits.keys())}): {error}") from error
        except NotImplementedError as error:  # Stored as TFRecord: no random access.
            self._examples = self._load_whole(builder, error)
        if not len(self._examples):
            raise ValueError(f"data.source: split {split!r} ({split_field}={self.tfds_split!r}) of tfds data set "
                             f"{name!r} is empty")

    def _load_whole(self, builder: tfds.core.DatasetBuilder, error: NotImplementedError) -> list[dict]:
        """Every example's text of a TFRecord data set, through `tfds.load` (TensorFlow); or the reason it can't."""
        if not tensorflow_installed():
            raise ValueError(f"data.source: tfds data set {self.name!r} is stored as {builder.info.file_format.value}, "
                             f"which has no random access without TensorFlow; rebuild it with "
                             f"`tfds build {self.name} --file_format=array_record` or install longctx[tfds] "
                             f"(tensorflow) to read it whole through tfds.load") from error
        logger.warning("data.source: tfds data set %r is stored as %s; reading split %r whole into memory through "
                       "tfds.load (rebuild it with --file_format=array_record for random access)",
                       self.name, builder.info.file_format.value, self.tfds_split)
        dataset = builder.as_dataset(split=self.tfds_split)
        return [{self.text_field: example[self.text_field]} for example in tfds.as_numpy(dataset)]

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> str:
        index = self._checked_index(index)
        value = self._examples[index][self.text_field]
        if isinstance(value, str):
            return value
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"data.source: {self.key(index)} is not UTF-8 ({error.reason} at byte "
                             f"{error.start})") from error

    def key(self, index: int) -> str:
        return f"{self.name}/{self.tfds_split}:{self._checked_index(index)}"

    def describe(self) -> str:
        return (f"TfdsSource({self.name!r}, split={self.split!r} (tfds {self.tfds_split!r}): {len(self)} documents, "
                f"feature {self.text_field!r})")
