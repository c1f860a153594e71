"""The batch job's driver (`python -m deployments.batch.job SPEC_JSON`, run by Ray's job supervisor): streams
the input through the model's engines with Ray Data and writes one output line per input line.

Rows flow input file -> byte ranges (read tasks) -> BatchRunner actors -> this driver, which appends them to
`<output>.partial` and renames that to the output once every line is written, so the output path only ever holds
a whole result. The driver holds one block at a time: Ray Data's streaming executor bounds what is in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from deployments.batch.progress import Progress
from deployments.batch.spec import BatchJobSpec, partial_path

__all__ = ["index_input", "main", "read_range", "run"]

_PROGRESS_EVERY_S = 1.0
# Each range is a read task and a block: bounded, so that a huge input neither floods Ray with tiny tasks nor
# holds a large index in this driver (progress then moves in steps of 1/10,000 of the input).
_MAX_RANGES = 10_000


def index_input(path: Path, range_lines: int, max_ranges: int = _MAX_RANGES) -> tuple[list[dict[str, Any]], int]:
    """One streaming pass over the input: byte ranges of `range_lines` lines each (more when that would make more
    than `max_ranges`), and how many lines are requests.

    Blank lines are no requests (JSONL readers skip them too) but keep their numbers, so that error messages name
    the line an editor shows.

    Returns:
        The ranges (`path`, `start`, `end` byte offsets, `first_line` number) and the number of request lines.
    """
    starts, firsts = array("q"), array("q")  # compact: one entry per range_lines lines of a file of any size
    total = offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f):
            if number % range_lines == 0:
                starts.append(offset)
                firsts.append(number + 1)
            offset += len(raw)
            total += bool(raw.strip())
    step = max(1, -(-len(starts) // max_ranges))  # ceil: the ranges merged into one
    ranges = []
    for i in range(0, len(starts), step):
        end = starts[i + step] if i + step < len(starts) else offset
        ranges.append({"path": str(path), "start": starts[i], "end": end, "first_line": firsts[i]})
    return ranges, total


def read_range(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The request lines of one byte range: `line` (1-based number) and `raw` (the bytes, undecoded)."""
    rows = []
    with open(item["path"], "rb") as f:
        f.seek(item["start"])
        number = item["first_line"]
        while f.tell() < item["end"]:
            raw = f.readline()
            if not raw:
                break
            if raw.strip():
                rows.append({"line": number, "raw": raw})
            number += 1
    return rows


def run(spec: BatchJobSpec, on_progress: Callable[[Progress], None] = lambda p: None) -> Progress:
    """Answer every line of the input; call `on_progress` at most about once a second, and at the end.

    Returns:
        The final count (done == total).

    Raises:
        FileNotFoundError: the input does not exist on this node.
        RuntimeError: fewer output lines than input lines came back (a bug: each row yields exactly one).
    """
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False  # they would fill the job log that `batch status` reads

    source, output = Path(spec.input), Path(spec.output)
    # One engine batch per byte range, one range per block: Ray Data yields a block of results per task, so each
    # batch reaches this driver (and the progress count) as soon as it is answered, not a big block later.
    ranges, total = index_input(source, spec.batch_size)
    progress = Progress(done=0, total=total, failed=0)
    on_progress(progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(partial_path(str(output)))
    errors = Path(spec.errors) if spec.errors else None
    with contextlib.ExitStack() as files:
        out = files.enter_context(partial.open("w", encoding="utf-8"))
        err = files.enter_context(Path(partial_path(str(errors))).open("w", encoding="utf-8")) if errors else out
        if total:  # no request lines: no engine to start
            progress = _answer(spec, ranges, out, err, progress, on_progress)
    if progress.done != total:
        raise RuntimeError(f"{progress.done} output lines for {total} input lines; partial output in {partial}")
    if errors:
        os.replace(partial_path(str(errors)), errors)
    os.replace(partial, output)
    on_progress(progress)
    return progress


def _answer(
    spec: BatchJobSpec,
    ranges: list[dict[str, Any]],
    out: TextIO,
    err: TextIO,
    progress: Progress,
    on_progress: Callable[[Progress], None],
) -> Progress:
    """Stream the ranges through the model's engines; append each block's lines to `out`, its failed ones to `err`
    (which may be `out`)."""
    import ray.data

    from deployments.batch.runner import BatchRunner

    dataset = (
        ray.data.from_items(ranges, override_num_blocks=len(ranges))
        .flat_map(read_range)
        .map_batches(
            BatchRunner,
            fn_constructor_args=(spec.model.model_dump_json(), spec.endpoint, spec.names),
            batch_size=spec.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=spec.concurrency),
            **spec.model.serve_options["ray_actor_options"],  # what one replica of the model asks of Ray
        )
    )
    last_report = time.monotonic()
    for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        lines, failures = block["output"], block["failed"]
        if err is out:
            out.write("".join(f"{line}\n" for line in lines))
        else:
            out.write("".join(f"{line}\n" for line, bad in zip(lines, failures, strict=True) if not bad))
            err.write("".join(f"{line}\n" for line, bad in zip(lines, failures, strict=True) if bad))
            err.flush()
        out.flush()
        failed = progress.failed + int(failures.sum())
        progress = Progress(done=progress.done + len(lines), total=progress.total, failed=failed)
        if time.monotonic() - last_report >= _PROGRESS_EVERY_S:
            on_progress(progress)
            last_report = time.monotonic()
    return progress


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the job: the one argument is the BatchJobSpec as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m deployments.batch.job SPEC_JSON", file=sys.stderr)
        return 2
    spec = BatchJobSpec.model_validate_json(args[0])
    import ray

    started = time.monotonic()
    ray.init(logging_level=logging.WARNING)  # the job supervisor says where (RAY_ADDRESS) and with which token
    try:
        final = run(spec, on_progress=lambda p: print(p.line(), flush=True))
    finally:
        ray.shutdown()
    print(
        f"[modelfleet-batch] wrote {final.done} lines ({final.failed} failed) to {spec.output} "
        f"in {time.monotonic() - started:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
