"""Shared shape of synpref's data modules: a tokenizer, a train/val split, length-grouped loaders."""

from __future__ import annotations

import math
from typing import Optional

import datasets
import lightning as L
from torch.utils.data import DataLoader

from synpref.core.errors import ConfigError
from synpref.core.models import load_tokenizer


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
    and `collate`; this class owns the tokenizer, the validation split and the loaders."""

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
        self.train_set, self.val_set = train, val

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
