"""Long evaluation work (answering 805 instructions, judging them) done and stored in
chunks, so a re-run picks up after the last stored chunk and a finished job is read back
instead of redone.

    <directory>/settings.json     what decides the rows; a re-run with others is refused
    <directory>/chunk_00000.json  the rows of items [0, chunk_size), written atomically

Every rank runs ``compute`` for each missing chunk (generation is spread over the ranks'
engines), rank 0 writes it; which chunks are finished is rank 0's view, broadcast. A
single process needs no process group.
"""

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from tqdm.auto import tqdm

from megatron_tpo.config.errors import ConfigError
from megatron_tpo.files import atomic_write
from megatron_tpo.parallel.collectives import is_rank_zero, rank_zero_result

SETTINGS = "settings.json"


def _write_json(path: Path, body: Any) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(body, indent=1).encode()))


class ChunkStore:
    def __init__(self, directory: Path, settings: Dict[str, Any], chunk_size: int):
        if chunk_size < 1:
            raise ConfigError(f"--chunk-size={chunk_size}: must be >= 1")
        self.directory, self.settings, self.chunk_size = Path(directory), settings, chunk_size

    def chunk_path(self, index: int) -> Path:
        return self.directory / f"chunk_{index:05d}.json"

    def open(self) -> None:
        """Rank 0: record the settings, or refuse a directory made with other ones."""
        path = self.directory / SETTINGS
        wanted = {**self.settings, "chunk_size": self.chunk_size}
        if path.is_file():
            stored = json.loads(path.read_text())
            differing = sorted(k for k in set(stored) | set(wanted)
                               if stored.get(k) != wanted.get(k))
            if differing:
                raise ConfigError(f"{self.directory} holds rows made with other settings "
                                  f"({', '.join(differing)}: {stored.get(differing[0])!r} there, "
                                  f"{wanted.get(differing[0])!r} now); use another --out or "
                                  "delete that directory")
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_json(path, wanted)

    def finished(self, count: int) -> List[bool]:
        return [self.chunk_path(i).is_file() for i in range(count)]

    def write(self, index: int, rows: List[dict]) -> None:
        _write_json(self.chunk_path(index), rows)

    def read(self, index: int) -> List[dict]:
        return json.loads(self.chunk_path(index).read_text())


# How long the other ranks wait for what rank 0 does alone (converting a 70B checkpoint,
# reading back 805 stored answers), on the store rather than in a collective.
RANK_ZERO_TIMEOUT_SECONDS = 4 * 3600.0


def rank_zero_value(work: Callable[[], Any], what: str = "tpo-eval's rank-0 work") -> Any:
    """``work()`` on rank 0, its value on every rank; a ``ConfigError`` of rank 0 is raised
    on every rank, so a refused directory stops the whole world, not rank 0 alone. The
    other ranks wait on the store (``parallel.collectives.rank_zero_result``), not in a
    collective that a long conversion would outlast."""
    def guarded():
        try:
            return work(), None
        except ConfigError as error:
            return None, str(error)

    value, failure = rank_zero_result(guarded, what, RANK_ZERO_TIMEOUT_SECONDS,
                                      "RANK_ZERO_TIMEOUT_SECONDS (evaluation/chunks.py)")
    if failure is not None:
        raise ConfigError(failure)
    return value


def run_in_chunks(store: ChunkStore, items: Sequence, compute: Callable[[Sequence], List[dict]],
                  description: str, progress: bool = True) -> List[dict]:
    """``compute(items[a:b])`` for every chunk not yet stored, then every row, in order, on
    every rank. ``compute`` must return one row per item."""
    count = (len(items) + store.chunk_size - 1) // store.chunk_size

    def open_store() -> List[bool]:
        store.open()
        return store.finished(count)

    done = rank_zero_value(open_store, f"opening {store.directory}")
    bar = tqdm(total=len(items), desc=description, unit="item",
               disable=not (progress and is_rank_zero()))
    for index in range(count):
        chunk = items[index * store.chunk_size:(index + 1) * store.chunk_size]
        if not done[index]:
            rows = compute(chunk)
            if len(rows) != len(chunk):
                raise RuntimeError(f"{description}: {len(rows)} rows for {len(chunk)} items")
            if is_rank_zero():
                store.write(index, rows)
        bar.update(len(chunk))
    bar.close()
    return rank_zero_value(lambda: [row for index in range(count) for row in store.read(index)],
                           f"reading {store.directory}")
