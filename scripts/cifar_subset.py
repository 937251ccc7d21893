"""Rewrite a parquet split in the hub schema (e.g. CIFAR-10's ``train.parquet``) shuffled,
optionally as a random subset, with pyarrow's default (snappy) compression, keeping the schema
and its ``huggingface`` features metadata.

The device check's checkout travels with a 64 MiB limit: the shared CIFAR-10 files hold
uncompressed JPEG bytes (47 + 9 MB), which snappy brings to 18 MB.

    python scripts/cifar_subset.py ../shared/data/cifar10/train.parquet \\
        .device_data/cifar10/train.parquet [--num_rows 30000]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def write_subset(source: Path, destination: Path, num_rows: int | None, seed: int = 0) -> int:
    """Rows drawn without replacement (all rows, shuffled, when ``num_rows`` is None or larger
    than the table); returns the number written."""
    table = pq.read_table(source)
    rows = len(table) if num_rows is None else min(num_rows, len(table))
    order = np.random.default_rng(seed).permutation(len(table))[:rows]
    destination.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(order), destination)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("destination", type=Path)
    parser.add_argument("--num_rows", type=int, help="Default: every row.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = write_subset(args.source, args.destination, args.num_rows, args.seed)
    print(f"{args.destination}: {rows} rows")


if __name__ == "__main__":
    main()
