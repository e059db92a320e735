"""Lineage in MLflow: a run's data as dataset inputs (source, content digest) and the runs that made its inputs, found by content."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Optional

from synpref.core.fingerprints import file_sha256, tree_digest
from synpref.core.resources import resolve

# Tags carrying what a run wrote, by content: an SFT or DPO export (HFExportCallback) and a pairs file
# (sampling, `synpref pairs`). A later run finds the run that made its input by the input's digest, so
# the link survives moved folders and never names a run whose output was since overwritten.
EXPORT_TAG, PAIRS_TAG = "synpref.export_sha256", "synpref.pairs_sha256"
MADE_BY = "synpref.made_by_run"  # a dataset input's tag: the run that wrote that file
DIGEST_LENGTH = 32  # MLflow stores a dataset digest in 36 characters


def content_digest(path: str) -> Optional[str]:
    """sha256 of a local file or folder (None for a hub dataset)."""
    local = Path(resolve(path))
    if local.is_file():
        return file_sha256(local)
    return tree_digest(local, file_sha256, ()) if local.is_dir() else None


def run_with_tag(client, tag: str, value: Optional[str]) -> Optional[str]:
    """The latest run of any experiment tagged `tag` = `value` (None when there is none)."""
    if not value:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def dataset_input(client, path: str, context: str, split: Optional[str] = None, config_name: Optional[str] = None):
    """A DatasetInput for `path`: a local file or folder (its content digest; the run that wrote it,
    for a pairs file, as the tag MADE_BY) or a hub dataset (its id, config and split)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    digest = content_digest(path)
    tags = [InputTag("mlflow.data.context", context)]
    if digest is None:
        source = HuggingFaceDatasetSource(path, config_name=config_name, split=split)
        digest = hashlib.sha256(f"{path}:{config_name}:{split}".encode()).hexdigest()
    else:
        with warnings.catch_warnings():  # MLflow registers local files under two sources of one class
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(resolve(path)).resolve()))
        maker = run_with_tag(client, PAIRS_TAG, digest)
        if maker:
            tags.append(InputTag(MADE_BY, maker))
    dataset = MetaDataset(source, name=path, digest=digest[:DIGEST_LENGTH])
    return DatasetInput(dataset._to_mlflow_entity(), tags)


def log_lineage(client, run_id: str, data: list[dict], models: dict[str, str]) -> None:
    """Log `data` (dicts of dataset_input's arguments) as the run's dataset inputs, and tag the run with
    the runs that made them: `synpref.sampling_run_id` for generated pairs, and for each
    `models` entry (tag → model path) the run whose export that model is (`synpref.sft_run_id`)."""
    inputs = [dataset_input(client, **d) for d in data]
    client.log_inputs(run_id, datasets=inputs)
    makers = [t.value for i in inputs for t in i.tags if t.key == MADE_BY]
    if makers:
        client.set_tag(run_id, "synpref.sampling_run_id", ",".join(dict.fromkeys(makers)))
    for tag, path in models.items():
        from synpref.core.fingerprints import model_digest

        maker = run_with_tag(client, EXPORT_TAG, model_digest(path)) if Path(path).is_dir() else None
        if maker:
            client.set_tag(run_id, tag, maker)
