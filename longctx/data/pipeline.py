"""From `config.data` to training batches: sources → token documents → mixture → this shard → packing.

    source(s) ─ tokenize (text sources) ─ shard [k::K] ─ shuffle, repeat (reshuffled per epoch) ─ mix by weight
        ─ concat | first_fit | best_fit | untie_knots packing ─ batches of the shard's rows
    or, with data.packing=decomposition, per-bucket streams of the same documents ─ one bucket per step

A global batch is the concatenation of `K = data.num_shards` shard batches, each `1/K` of its rows, each from its
own `1/K` of the documents (`longctx.parallel.mesh.data_shards` says which shards a process reads); so a run's
batches depend on K, never on how many processes share the work. Every stream is a grain iterator whose
`get_state()` the trainer saves with each checkpoint (`ShardedBatches` holds the states of a process's shards), so
a resumed run yields the same batches. Nothing here touches jax.
"""

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from longctx.data import curriculum, packing, untie_knots
from longctx.data.packing import tokenize_documents
from longctx.data.sources import DocumentSource, open_source
from longctx.data.tokenizers import Tokenizer

log = logging.getLogger("longctx.data")

MIXTURE = "mixture"
PACKINGS = packing.PACKING_MODES + ("untie_knots", "decomposition")


@dataclasses.dataclass
class Corpus:
    """One source of the mixture as framed int32 documents (all shards), their token counts when known, its
    weight, a share of tokens (`data.mixture.<name>.weight`), and its mean document length (`mean_length`)."""

    name: str
    documents: grain.MapDataset
    lengths: np.ndarray | None
    weight: float
    mean_length: float
    synthetic: bool = False  # the pass-key documents of data.passkey_fraction: a share of documents, not tokens


@dataclasses.dataclass
class Component:
    """One source of a mixture, this shard's part: framed int32 documents, their token counts (when known), the
    share of documents drawn from it and its mean document length."""

    name: str
    documents: grain.MapDataset
    lengths: np.ndarray | None
    weight: float
    mean_length: float


def source_specs(data: ml_collections.ConfigDict) -> dict[str, tuple[str, float]]:
    """{component name: (source spec, weight)}: `data.mixture` when `data.source` is "mixture", else the one source
    with weight 1. Raises ValueError naming the field at fault."""
    if data.source != MIXTURE:
        if len(data.mixture):
            raise ValueError(f"data.mixture is only read when data.source={MIXTURE!r}; data.source is "
                             f"{data.source!r}; empty data.mixture or set data.source={MIXTURE!r}")
        return {"source": (data.source, 1.0)}
    if not len(data.mixture):
        raise ValueError(f"data.source={MIXTURE!r} needs components in data.mixture: "
                         f"{{name: {{'source': <spec>, 'weight': <float>}}}}")
    specs = {}
    for name, component in data.mixture.items():
        keys = set(component.keys()) if isinstance(component, (dict, ml_collections.ConfigDict)) else None
        if keys != {"source", "weight"}:
            raise ValueError(f"data.mixture.{name} must have exactly the fields source and weight, got "
                             f"{sorted(keys) if keys is not None else component!r}")
        if not isinstance(component["source"], str) or component["source"] == MIXTURE:
            raise ValueError(f"data.mixture.{name}.source must be a source spec, got {component['source']!r}")
        weight = component["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"data.mixture.{name}.weight must be a number > 0, got {weight!r}")
        specs[name] = (component["source"], float(weight))
    return specs


def open_sources(data: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer) -> dict[str, DocumentSource]:
    """Every source of `data` opened for `split`; a pre-tokenised one must match `tokenizer`."""
    sources = {}
    for name, (spec, _) in source_specs(data).items():
        source = open_source(spec, split, text_field=data.text_field, valid_fraction=data.valid_fraction,
                             on_error=data.on_error, tfds_data_dir=data.tfds_data_dir,
                             tfds_train_split=data.tfds_train_split, tfds_valid_split=data.tfds_valid_split)
        if source.tokenized:
            source.check_tokenizer(tokenizer)
        sources[name] = source
    return sources


def token_documents(source: DocumentSource, tokenizer: Tokenizer, *,
                    need_lengths: bool = False) -> tuple[grain.MapDataset, np.ndarray | None]:
    """The documents of `source` as framed int32 arrays, and their lengths.

    Text is tokenised lazily, document by document, as the stream reads it; with `need_lengths` (Dataset
    Decomposition indexes pieces by length up front) it is tokenised once, in batches, and kept in memory.
    """
    documents = grain.MapDataset.source(source)
    if source.tokenized:
        lengths = source.lengths()
        return documents, (None if lengths is None else np.asarray(lengths))
    if not need_lengths:
        return documents.map(lambda text: tokenizer.frame(tokenizer.encode(text))), None
    framed = tokenize_documents([source[i] for i in range(len(source))], tokenizer)
    return grain.MapDataset.source(framed), np.array([len(doc) for doc in framed])


def passkey_documents(config: ml_collections.ConfigDict, tokenizer: Tokenizer, count: int) -> list[np.ndarray]:
    """`count` synthetic pass-key documents of up to seq_len tokens (`data.passkey_fraction`)."""
    from longctx.eval import passkey  # eval imports data; only training mixes pass-key documents in.

    rng = np.random.default_rng([config.seed, 1])
    texts = [passkey.training_text(tokenizer, config.data.seq_len, rng) for _ in range(count)]
    return tokenize_documents(texts, tokenizer)


def training_corpora(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list[Corpus]:
    """Every training source of the mixture, opened and checked once for all shards; with `data.passkey_fraction`
    f > 0 a synthetic "passkey" corpus too, sized so that it is share f of the documents (see `components`)."""
    data = config.data
    need_lengths = data.packing == "decomposition"
    sources = open_sources(data, "train", tokenizer)
    corpora = []
    for name, (_, weight) in source_specs(data).items():
        documents, lengths = token_documents(sources[name], tokenizer, need_lengths=need_lengths)
        corpora.append(Corpus(name, documents, lengths, weight, mean_length(documents, lengths)))
    if data.passkey_fraction:
        num_corpus = sum(len(corpus.documents) for corpus in corpora)
        framed = passkey_documents(config, tokenizer, max(1, round(num_corpus * data.passkey_fraction
                                                                   / (1 - data.passkey_fraction))))
        lengths = np.array([len(doc) for doc in framed])
        corpora.append(Corpus("passkey", grain.MapDataset.source(framed), lengths, data.passkey_fraction,
                              float(np.mean(lengths)), synthetic=True))
    return corpora


def mean_length(documents: grain.MapDataset, lengths: np.ndarray | None, sample: int = 256) -> float:
    """Mean tokens per document: exact from `lengths`, else from `sample` documents spread evenly over the set."""
    if lengths is not None:
        return float(np.mean(lengths))
    picks = np.unique(np.linspace(0, len(documents) - 1, min(sample, len(documents))).round().astype(int))
    return float(np.mean([len(documents[int(i)]) for i in picks]))


def components(corpora: Sequence[Corpus], passkey_fraction: float, *, shard_index: int,
               num_shards: int) -> list[Component]:
    """This shard's part `[shard_index::num_shards]` of every corpus, with the share of documents drawn from each.

    Mixture weights are shares of tokens (as ProLong's recipe states them): a corpus's share of documents is its
    weight over its mean document length (over all shards: exact for pre-tokenised sources, else from a sample),
    normalised, times 1 - `passkey_fraction`; the pass-key corpus takes `passkey_fraction` of the documents.
    """
    parts = []
    for corpus in corpora:
        documents = corpus.documents[shard_index::num_shards]
        if len(documents) == 0:
            raise ValueError(f"data shard {shard_index} of {num_shards} of {corpus.name!r} holds no documents "
                             f"({len(corpus.documents)} in all); lower data.num_shards or add documents")
        lengths = None if corpus.lengths is None else corpus.lengths[shard_index::num_shards]
        parts.append(Component(corpus.name, documents, lengths, corpus.weight, corpus.mean_length))
    natural = [(part, corpus) for part, corpus in zip(parts, corpora) if not corpus.synthetic]
    shares = [corpus.weight / corpus.mean_length for _, corpus in natural] if len(natural) > 1 else [1.0]
    for (part, _), share in zip(natural, shares):
        part.weight = share / sum(shares) * (1 - passkey_fraction)
    if len(parts) > 1 and shard_index == 0:
        log.info("mixture: share of documents %s", {part.name: round(part.weight, 4) for part in parts})
    return parts


def bucket_weights(corpora: Sequence[Corpus], passkey_fraction: float,
                   data: ml_collections.ConfigDict) -> np.ndarray:
    """Each Dataset Decomposition bucket's share of the tokens over ALL shards' documents (the natural mix), so
    that every shard draws the same bucket at every step."""
    parts = components(corpora, passkey_fraction, shard_index=0, num_shards=1)
    counts = [(curriculum.bucket_token_counts(corpus.lengths, seq_len=data.seq_len,
                                              min_len=data.decomposition.min_len)[0], part.weight * part.mean_length)
              for corpus, part in zip(corpora, parts)]
    return curriculum.natural_bucket_weights(counts)


def document_stream(parts: Sequence[Component], seed: int, read_threads: int = 0) -> grain.IterDataset:
    """The endless stream of the components' documents: each shuffled (reshuffled every epoch) and repeated, then
    interleaved by weight (grain's deterministic weighted mix), read by `read_threads` threads (0: in the caller's
    thread, no prefetch)."""
    streams = [part.documents.shuffle(seed=seed + i).repeat() for i, part in enumerate(parts)]
    mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [part.weight for part in parts])
    return mixed.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads))


def marker_ids(markers: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """The Untie-the-Knots marker strings of `data.untie_knots.markers`, tokenised; `id_alphabet` is a string of
    characters each of which must be one token (chunk IDs are drawn from them)."""
    ids = {name: np.asarray(tokenizer.encode(text), dtype=np.int32) for name, text in markers.items()
           if name != "id_alphabet"}
    alphabet = [tokenizer.encode(char) for char in markers.id_alphabet]
    if not alphabet or any(len(token) != 1 for token in alphabet):
        raise ValueError(f"data.untie_knots.markers.id_alphabet must be characters that are one token each for "
                         f"{tokenizer!r}, got {markers.id_alphabet!r}")
    ids["id_alphabet"] = np.array([token[0] for token in alphabet], dtype=np.int32)
    return ids


def shard_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer, corpora: Sequence[Corpus], *,
                  shard_index: int, num_shards: int, dd_weights: np.ndarray | None = None) -> grain.DatasetIterator:
    """The iterator of data shard `shard_index`'s batches: `train.batch_size / num_shards` rows of `data.seq_len`
    (with decomposition: `batch_size × seq_len / num_shards` tokens in rows of the step's bucket length, the buckets
    drawn by `dd_weights`, default `bucket_weights` of `corpora`)."""
    data = config.data
    parts = components(corpora, data.passkey_fraction, shard_index=shard_index, num_shards=num_shards)
    rows = config.train.batch_size // num_shards
    seed = config.seed
    if data.packing == "decomposition":
        dd = data.decomposition
        # Dataset Decomposition mixes by share of tokens: a document share times the mean length.
        return curriculum.decomposed_batches(
            [(part.documents, part.lengths, part.weight * part.mean_length) for part in parts],
            seq_len=data.seq_len, min_len=dd.min_len, tokens_per_step=rows * data.seq_len, curriculum=dd.curriculum,
            steps=config.train.steps, cycles=dd.cycles, seed=seed,
            bucket_weights=bucket_weights(corpora, data.passkey_fraction, data) if dd_weights is None else dd_weights)
    stream = document_stream(parts, seed, data.read_threads)
    if data.packing == "untie_knots":
        utk = data.untie_knots
        dataset = untie_knots.untie_knots_batches(
            stream, seq_len=data.seq_len, batch_size=rows, pad_id=tokenizer.pad_id, seed=seed,
            markers=marker_ids(utk.markers, tokenizer), restore=utk.restore, num_chunks=utk.num_chunks,
            keep_chunk_order=utk.keep_chunk_order, knot_prob=utk.knot_prob)
    else:
        dataset = packing.packed_batches(stream, mode=data.packing, seq_len=data.seq_len, batch_size=rows,
                                         pad_id=tokenizer.pad_id, seed=seed,
                                         num_packing_bins=data.num_packing_bins or None)
    return iter(dataset)


class ShardedBatches(grain.DatasetIterator):
    """A process's part of every global batch: the batches of its data shards, concatenated along rows in shard
    order. `row_offset(rows)` is where that part starts in a global batch of `rows` rows. Its state holds every
    shard's iterator state and the shard layout, which a restore must match."""

    def __init__(self, shards: Sequence[int], num_shards: int, iterators: Sequence[grain.DatasetIterator]):
        super().__init__(list(iterators))
        self.shards, self.num_shards = list(shards), num_shards

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(iterator) for iterator in self._parents]
        if len(batches) == 1:
            return batches[0]
        return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

    def row_offset(self, global_rows: int) -> int:
        return self.shards[0] * global_rows // self.num_shards

    def get_state(self) -> dict[str, Any]:
        return {"shards": self.shards, "num_shards": self.num_shards,
                "iterators": [iterator.get_state() for iterator in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        if "shards" not in state:
            raise ValueError("the checkpoint's data iterator state predates data shards (an older longctx); its run "
                             "cannot resume with the same batches: start from its params with train.init_from")
        if (list(state["shards"]), state["num_shards"]) != (self.shards, self.num_shards):
            raise ValueError(f"the checkpoint's data iterator read shards {state['shards']} of {state['num_shards']}; "
                             f"this process reads shards {self.shards} of {self.num_shards}. Resume with the "
                             f"data.num_shards and process layout of the run that saved it")
        for iterator, iterator_state in zip(self._parents, state["iterators"]):
            iterator.set_state(iterator_state)


def train_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer, shards: Sequence[int],
                  num_shards: int) -> ShardedBatches:
    """The training batches of data shards `shards` of `num_shards` (see `longctx.parallel.mesh.data_shards`).
    The sources are opened (and checked) once for all shards, and Dataset Decomposition's bucket weights computed
    once over all of them."""
    corpora = training_corpora(config, tokenizer)
    dd_weights = (bucket_weights(corpora, config.data.passkey_fraction, config.data)
                  if config.data.packing == "decomposition" else None)
    return ShardedBatches(shards, num_shards, [
        shard_batches(config, tokenizer, corpora, shard_index=shard, num_shards=num_shards, dd_weights=dd_weights)
        for shard in shards])


def batch_shapes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """Every (rows, length) a global training batch can have: one shape, or one per Dataset Decomposition bucket."""
    data = config.data
    if data.packing != "decomposition":
        return [(config.train.batch_size, data.seq_len)]
    return curriculum.batch_shapes(seq_len=data.seq_len, min_len=data.decomposition.min_len,
                                   tokens_per_step=config.train.batch_size * data.seq_len)


def eval_documents(data: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer) -> list[np.ndarray]:
    """Every document of `split` of every source of `data`, framed int32, in source order (evaluation reads these)."""
    documents = []
    for source in open_sources(data, split, tokenizer).values():
        texts_or_tokens = [source[i] for i in range(len(source))]
        documents.extend(texts_or_tokens if source.tokenized else tokenize_documents(texts_or_tokens, tokenizer))
    return documents
