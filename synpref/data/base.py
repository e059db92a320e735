"""Shared shape of synpref's data modules: a tokenizer, a train/val split, length-grouped loaders."""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from typing import Callable, Optional

import datasets
import lightning as L
from torch.utils.data import DataLoader

from synpref.core.errors import ConfigError
from synpref.core.models import load_tokenizer
from synpref.data.io import OnBadRow, load_rows, map_rows, source_name


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into Lightning checkpoints.

    Lightning's fit loop saves `state_dict()` of a loader that has one and loads it back on
    resume; the next epoch pass then skips the batches already trained. The sampler's order is
    a function of its seed and epoch (set by Lightning before the first batch is drawn), so
    skipping its first k batches yields exactly the batches an uninterrupted run trains next.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yielded = 0  # batches handed out in the current pass
        self._skip = 0  # batches to pass over at the start of the next pass (set by load_state_dict)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        # A generator: nothing is drawn from the sampler before Lightning has set its epoch.
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)  # collated and dropped; no model work
        self._yielded = skip
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches_yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        done = int(state.get("batches_yielded", 0))
        self._skip = done if 0 < done < len(self) else 0


class TokenizedDataModule(L.LightningDataModule):
    """Subclasses implement `prepare(split) -> datasets.Dataset` (tokenized rows with a `length`)
    and `collate`; this class owns the tokenizer, the validation split and the loaders.

    Args:
        tokenizer_name_or_path: HF directory or hub id of the tokenizer (the policy's).
        batch_size: rows per training step (per device).
        eval_batch_size: rows per validation step (None: batch_size).
        val_fraction: the share of training rows held out for validation when there is no
            validation source.
        group_by_length: batches of similar lengths (less padding), in a seeded order.
        num_workers: DataLoader worker processes.
        seed: the split's, the length grouping's and the source weights' seed.
        trust_remote_code: allow a hub tokenizer's custom code.
        on_bad_row: a malformed row is an `error` (file, row, field) or skipped and counted (`skip`).
        num_proc: processes that tokenize (None: this one).
    """

    #: Subclasses whose rows carry a stable `index` (cached reference log-probs key on it).
    numbered = False

    def __init__(
        self,
        tokenizer_name_or_path: str,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        val_fraction: float = 0.0,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        trust_remote_code: bool = False,
        on_bad_row: OnBadRow = "error",
        num_proc: Optional[int] = None,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError("data.init_args.val_fraction", f"must lie in [0, 1), got {val_fraction}")
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.on_bad_row, self.num_proc = on_bad_row, num_proc
        self._tokenizer = None
        self.train_set: Optional[datasets.Dataset] = None
        self.val_set: Optional[datasets.Dataset] = None
        self.drop_counts: dict[str, int] = {}
        self._train_loader: Optional[ResumableDataLoader] = None
        self._resume_position: dict = {}  # from a checkpoint, for the next train loader

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name_or_path, self.trust_remote_code)
        return self._tokenizer

    # -- subclass hooks ------------------------------------------------------------------------
    def prepare(self, split: str) -> Optional[datasets.Dataset]:
        """Tokenized rows of 'train' or 'val'; None for 'val' when the source has no named split."""
        raise NotImplementedError

    def collate(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        train = self.prepare("train")
        val = self.prepare("val")
        if val is None and self.val_fraction > 0:
            n_val = math.ceil(self.val_fraction * len(train))
            if len(train) - n_val < 1:
                raise ConfigError(
                    "data.init_args.val_fraction",
                    f"{self.val_fraction} of {len(train)} usable rows leaves "
                    f"none to train on; give more rows, or set val_fraction: 0",
                )
            parts = train.train_test_split(test_size=self.val_fraction, seed=self.seed, shuffle=True)
            train, val = parts["train"], parts["test"]
        if self.numbered:  # stable ids, assigned once after mixing and splitting: train 0..n-1, val n..n+m-1
            train = train.add_column("index", list(range(len(train))))
            if val is not None:
                val = val.add_column("index", list(range(len(train), len(train) + len(val))))
        self.train_set, self.val_set = train, val

    # -- several weighted sources (preference pairs, unpaired examples) ------------------------
    def keep_sources(self, kind: type, sources: list, val_sources: Optional[list]) -> None:
        """`sources` and `val_sources` as `kind` objects; in the hyper-parameters as plain dicts, so
        checkpoints load with torch.load(weights_only=True). Call after save_hyperparameters."""
        if not sources:
            raise ValueError(f"{type(self).__name__} needs at least one source")
        self.sources = [s if isinstance(s, kind) else kind(**s) for s in sources]
        self.val_sources = [s if isinstance(s, kind) else kind(**s) for s in val_sources or []]
        self.hparams["sources"] = [asdict(s) for s in self.sources]
        self.hparams["val_sources"] = [asdict(s) for s in self.val_sources]

    def rows_of(self, src) -> datasets.Dataset:
        """A source's raw rows, as `encode` takes them."""
        return load_rows(src.path, src.split, src.config_name, src.max_rows)

    def mix(
        self,
        sources: list,
        split: str,
        encode: Callable,
        columns: list[str],
        what: str,
        reshape: Optional[Callable[[datasets.Dataset], datasets.Dataset]] = None,
    ) -> datasets.Dataset:
        """Each source's rows as `encode(row, source)` makes them (then `reshape`d), its drops counted
        under `split` (and `source<k>` when there are several), weighted, all concatenated."""
        parts = []
        for k, src in enumerate(sources):
            rows = self.rows_of(src)
            name = source_name(src.path, src.split, src.config_name)
            ds, counts = map_rows(
                rows, lambda r, s=src: encode(r, s), name, columns, self.on_bad_row, what, self.num_proc
            )
            if reshape is not None:
                ds = reshape(ds)
            for reason, n in counts.items():
                key = f"{split}/{reason}" if len(sources) == 1 else f"{split}/source{k}/{reason}"
                self.drop_counts[key] = self.drop_counts.get(key, 0) + n
            parts.append(weighted(ds, src.weight, self.seed + k))
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    def _loader(self, ds: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        from synpref.data.collate import LengthGroupedSampler

        sampler = None
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.group_by_length:
            # Groups sized in global batches, so one device and N devices see the same global batches.
            sampler = LengthGroupedSampler(ds["length"], batch_size * world, seed=self.seed, shuffle=shuffle)
            if world > 1:
                # Shard the grouped order here (rank r takes every world-th index): Lightning's own
                # wrapper would reshuffle it, mixing lengths and changing which rows share a step.
                from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

                sampler = DistributedSamplerWrapper(
                    sampler, num_replicas=world, rank=self.trainer.global_rank, shuffle=False
                )
        # Resumable: a mid-epoch checkpoint restores the position in the epoch, not only its start.
        return ResumableDataLoader(
            ds.with_format(None),
            batch_size=batch_size,
            sampler=sampler,
            shuffle=shuffle and sampler is None,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_set, self.batch_size, shuffle=True)
        self._train_loader.load_state_dict(self._resume_position)
        self._resume_position = {}
        return self._train_loader

    # Lightning 2.6 builds the train loader (for `estimated_stepping_batches`) before it restores
    # a checkpoint's loop state, so a loader's own state_dict is saved but never loaded back; the
    # data module's state is restored first, so the position travels through it.
    def state_dict(self) -> dict:
        return {"train_position": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._resume_position = state.get("train_position", {})

    def val_dataloader(self):
        return [] if self.val_set is None else self._loader(self.val_set, self.eval_batch_size, shuffle=False)


def weighted(ds: datasets.Dataset, weight: float, seed: int) -> datasets.Dataset:
    """Each row floor(weight) times plus a seeded random share of the remainder."""
    if weight < 0:
        raise ValueError(f"source weight must be ≥ 0, got {weight}")
    whole, frac = int(weight), weight - int(weight)
    picks = list(range(len(ds))) * whole
    if frac > 0:
        picks += sorted(random.Random(seed).sample(range(len(ds)), round(frac * len(ds))))
    if not picks:
        raise ValueError(f"source weight {weight} keeps no row of {len(ds)}")
    return ds.select(picks)
