"""Checks at job creation that a job which passes validation can also run on this server: its server-side
evaluation partition exists (the data directory has the dataset, and the partition can be drawn)."""

from __future__ import annotations

import os

from shared.data.datasets import DataError, dataset_info, load_dataset
from shared.data.partition import PartitionError, PartitionSpec, check_partition
from shared.protocol.errors import ValidationError
from shared.protocol.job import JobConfig


def check_job(config: JobConfig, data_dir: str | os.PathLike | None) -> None:
    """ValidationError naming the field when the server could not run `config`."""
    if config.server_eval is not None:
        _check_eval_partition(config.server_eval, data_dir)


def _check_eval_partition(spec: PartitionSpec, data_dir: str | os.PathLike | None) -> None:
    name = spec.dataset
    try:
        info = dataset_info(name)
        if not info.shipped and data_dir is None:
            raise DataError(f"dataset {name!r} needs a data directory on the server: start it with "
                            "`fedgen server --data-dir DIR` (or FEDGEN_DATA_DIR)")
        dataset = load_dataset(name, data_dir)
        check_partition(dataset.train_y, dataset.test_y, info.num_classes, spec)
    except (DataError, PartitionError) as exc:
        raise ValidationError("bad_field", f"server_eval: {exc}") from None
