"""`LanceDataset`: a PyTorch `IterableDataset` over the samples table, read straight from
Lance (no copy of the data), for training on a curated selection.

The table is cut into units of physical rows (`unit_rows` of one fragment each); every
unit is read by exactly one DataLoader worker of exactly one rank (unit `u` goes to rank
`u % world_size`, then to worker `(u // world_size) % num_workers`), so across ranks and
workers no sample is read twice or missed. The order of samples is the order of units, and
of rows within them: fixed for a table version, a filter and `unit_rows`. `start` skips
that many samples of this order, to resume.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from curate.errors import CurateError, storage_message
from curate.filters import FilterError, combine
from curate.media.decode import MediaError, decode_image

try:
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # torch is the [models] extra
    raise ImportError("curate.data needs torch: pip install torch (the build for your "
                      "hardware), then 'curate[models]'") from exc

log = logging.getLogger(__name__)

#: Columns read besides the ones asked for: what decoding and the hash check need.
MEDIA_COLUMNS = ("sample_id", "uri", "media_type", "content_hash", "num_bytes", "error")
#: Pixels an image may have at most (decompression bombs are refused).
MAX_PIXELS = 178_956_970


class LanceDataset(IterableDataset):
    """Samples of a curate table as dicts: the chosen columns and, with `decode`, the image
    (`"image"`, RGB PIL) after `transform(sample)`.

    `where` is the API's filter language; `selected` (default True) keeps only the curated
    rows (None: every row). `version` is a table version number or tag. Rows whose media
    vanished or changed since ingest are skipped and counted in `skipped` (per worker).
    `storage_options` reach the table, `media_storage_options` media rows in object
    storage (empty: the environment's credentials)."""

    def __init__(self, uri: str, table: str = "samples", *, where: str | None = None,
                 selected: bool | None = True, version: int | str | None = None,
                 columns: list[str] | None = None, decode: bool = True,
                 max_side: int | None = None, transform: Callable | None = None,
                 rank: int = 0, world_size: int = 1, start: int = 0, unit_rows: int = 256,
                 storage_options: dict[str, str] | None = None,
                 media_storage_options: dict[str, str] | None = None):
        import lance

        from curate.table.layout import table_path

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        # opened with Lance alone: no LanceDB runtime in this process for DataLoader
        # workers to fork
        self.path = table_path(uri, table)
        self.storage_options = storage_options or None
        self.media_storage_options = dict(media_storage_options or {})
        try:
            dataset = lance.dataset(self.path, version=version,
                                    storage_options=self.storage_options)
        except (ValueError, OSError) as exc:
            raise CurateError(f"cannot open table {table} at {uri} (version "
                              f"{version if version is not None else 'latest'}): "
                              f"{storage_message(exc)}") from None
        self.version = int(dataset.version)
        names = dataset.schema.names
        if selected is not None and "selected" not in names:
            raise CurateError(f"table {table} has no `selected` column yet (no finished run); "
                              "pass selected=None for every row")
        try:
            self.filter = combine(where, selected, names)
        except FilterError as exc:
            raise CurateError(str(exc)) from None
        chosen = columns or [f.name for f in dataset.schema
                             if not str(f.type).startswith("fixed_size_list")]
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise CurateError(f"unknown columns {', '.join(unknown)}; columns: "
                              + ", ".join(names))
        self.columns = list(chosen)
        self.read_columns = list(dict.fromkeys([*self.columns,
                                                *(c for c in MEDIA_COLUMNS if c in names)]))
        self.decode, self.max_side, self.transform = decode, max_side, transform
        self.rank, self.world_size = rank, world_size
        self.units = [(f.fragment_id, lo, min(lo + unit_rows, rows))
                      for f in dataset.get_fragments()
                      for rows in [f.metadata.physical_rows]
                      for lo in range(0, rows, unit_rows)]
        self.skipped: Counter = Counter()
        self._first_unit, self._skip = self._resume_point(dataset, start)

    # --- planning ------------------------------------------------------------------------
    def _unit_filter(self, unit: tuple[int, int, int]) -> str:
        fragment, lo, hi = unit
        base = fragment << 32
        rows = f"_rowaddr >= {base + lo} AND _rowaddr < {base + hi}"
        return f"({self.filter}) AND {rows}" if self.filter else rows

    def _scan(self, dataset, unit, columns):
        fragment = dataset.get_fragment(unit[0])
        return dataset.scanner(columns=columns, filter=self._unit_filter(unit),
                               fragments=[fragment]).to_table()

    def _resume_point(self, dataset, start: int) -> tuple[int, int]:
        """The unit holding sample `start` of the order, and the samples to skip in it."""
        for index, unit in enumerate(self.units):
            if start <= 0:
                return index, 0
            count = self._scan(dataset, unit, ["sample_id"]).num_rows
            if start < count:
                return index, start
            start -= count
        return len(self.units), 0

    def my_units(self, worker: int = 0, workers: int = 1) -> list[int]:
        """Indexes of the units this rank's `worker` (of `workers`) reads."""
        mine = [u for u in range(self._first_unit, len(self.units))
                if u % self.world_size == self.rank]
        return [u for u in mine if (u // self.world_size) % workers == worker]

    def count(self) -> int:
        """Samples the filter keeps, over all ranks (before `start` and media checks)."""
        import lance

        dataset = lance.dataset(self.path, version=self.version,
                                storage_options=self.storage_options)
        return dataset.count_rows(filter=self.filter)

    # --- reading ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        import lance

        from curate.media.reader import MediaReader

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        dataset = lance.dataset(self.path, version=self.version,
                                storage_options=self.storage_options)
        reader = MediaReader(storage_options=self.media_storage_options)
        for unit in self.my_units(worker, workers):
            rows = self._scan(dataset, self.units[unit], self.read_columns).to_pylist()
            if unit == self._first_unit:
                rows = rows[self._skip:]
            for row in rows:
                sample = {c: row[c] for c in self.columns}
                if self.decode:
                    try:
                        sample["image"] = self._image(reader, row)
                    except MediaError as exc:
                        self.skipped[exc.code] += 1
                        log.warning("skipped %s: %s", row["uri"], exc)
                        continue
                yield self.transform(sample) if self.transform else sample

    def _image(self, reader, row: dict[str, Any]):
        if row.get("error") or not row.get("content_hash"):
            raise MediaError("error_row", f"the row has no media: {row.get('error')}")
        if row.get("media_type") not in (None, "image"):
            raise MediaError("not_an_image", f"a {row['media_type']} row; decode=False "
                             "yields its columns")
        data = reader.read_checked(row["uri"], int(row["num_bytes"]), row["content_hash"])
        return decode_image(data, MAX_PIXELS, self.max_side).image
