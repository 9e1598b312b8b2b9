"""Run one training job from the command line, with no Redis or Celery.

    python -m worker.cli --model transfer --train-samples 5000 --epochs 10 --output ./artifacts
    python -m worker.cli --model transfer --dataset ~/flowers --epochs 5      # a folder of class folders
    python -m worker.cli --model baseline --dataset flowers.tar.gz --test-fraction 0.1

Every field of the job body (shared/API.md, `POST /v1/jobs`) is a `--kebab-case` flag, validated by the same
`JobCreate` as the API (so the same messages). `--output DIR` overrides TL_ARTIFACT_DIR. Progress goes to stderr;
the last stdout line is one JSON object: the job's metrics plus "model_id", "model_dir" and "dataset_id".

`--dataset` is `cifar10` (the default), the id of a dataset already in the artifact store, or a local path:
a folder in any layout of shared/API.md "Datasets" (one folder per class, train/ + test/, labels.csv), or an
archive (zip, tar, tar.gz, npz). A path is processed first into the artifact store as an uploaded dataset
would be (`worker.dataset_tasks.process_dataset_now`; a folder is packed into an uncompressed zip for it),
split with `--test-fraction` (default 0.2) and `--seed`, and the job then trains on that dataset. The
dataset stays in the store (its id is in the JSON line: train on it again with `--dataset ID`); one that
fails its checks is removed after its message is printed.

Exit status: 0 done, 2 bad arguments (or a spec the data cannot satisfy, or a dataset that fails its checks),
1 training error, 130 interrupted (Ctrl-C stops the job at its next cancel check and keeps no model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.config import Settings, get_settings
from worker.engine.pipeline import LogReporter  # no TensorFlow at import: argument errors stay fast
from worker.errors import InvalidSpec, JobCancelled, TrainingError
from worker.jobstore import utc_now
from worker.spec import CIFAR10, JobCreate
from worker.store import open_dataset_store
from worker.store.datasets import DatasetRecord, new_dataset_id

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The bounds of POST /v1/datasets' `test_fraction`.
TEST_FRACTION_RANGE = (0.05, 0.5)
#: Validates the flags of a job on an uploaded dataset before the dataset exists (its rules differ from cifar10's).
_PENDING_ID = "ds_pending"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".npz", ".gz")

log = logging.getLogger("worker.cli")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.cli",
        description="Train one CIFAR-10 model (baseline CNN or MobileNetV2 transfer) and save it to the artifact "
                    "store. Flags are the fields of POST /v1/jobs; omitted ones take the API's defaults.",
    )
    for name, field in JobCreate.model_fields.items():
        help_text = field.description or ""
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        if default is not None and str(default) != "PydanticUndefined":
            help_text = f"{help_text} (default {default})".strip()
        if name == "dense_units":
            parser.add_argument(_flag(name), nargs="*", default=argparse.SUPPRESS, metavar="UNITS",
                                help=f"{help_text}; space- or comma-separated, none for no hidden layer")
        elif name == "augment":
            parser.add_argument(_flag(name), nargs="*", default=argparse.SUPPRESS, metavar="AUGMENTATION",
                                help=f"{help_text}; space- or comma-separated: flip rotate zoom translate contrast")
        elif name == "dataset":
            parser.add_argument(_flag(name), default=CIFAR10, metavar="DATASET",
                                help="`cifar10`, the id of a dataset in the artifact store, or a local folder of "
                                     "class folders (any layout of POST /v1/datasets) or archive (zip, tar, tar.gz, "
                                     "npz) to process into the artifact store first (default cifar10)")
        else:
            parser.add_argument(_flag(name), default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)
    parser.add_argument("--test-fraction", type=_test_fraction, default=None, metavar="F",
                        help="share of each class kept for testing when --dataset is a folder or archive without a "
                             f"split of its own ({TEST_FRACTION_RANGE[0]}..{TEST_FRACTION_RANGE[1]}, default 0.2)")
    parser.add_argument("--output", type=Path, default=None, metavar="DIR",
                        help="artifact directory to write the model (and a processed dataset) into "
                             "(overrides TL_ARTIFACT_DIR)")
    return parser


def _test_fraction(text: str) -> float:
    low, high = TEST_FRACTION_RANGE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {text}")
    return value


def _scalar(text: str) -> Any:
    """Numbers as numbers (so `--alpha 1.0` meets the Literal), everything else as given; pydantic validates."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def spec_from_args(values: dict[str, Any]) -> JobCreate:
    """A JobCreate from parsed flags; raises pydantic's ValidationError exactly as the API would."""
    body: dict[str, Any] = {}
    for name, value in values.items():
        if name == "dense_units":
            items = [part for item in value for part in str(item).split(",") if part.strip()]
            body[name] = [_scalar(item.strip()) for item in items]
        elif name == "augment":
            body[name] = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        elif name == "name":
            body[name] = value
        else:
            body[name] = _scalar(value)
    return JobCreate.model_validate(body)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "body"
        lines.append(f"  {_flag(loc) if error['loc'] else loc}: {error['msg']}")
    return "invalid job:\n" + "\n".join(lines)


# ----- a local dataset -----

class DatasetFailed(Exception):
    """A local dataset that did not become ready: `type` and the message of the dataset's error."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.type = error_type


def _local_source(value: str) -> Path | None:
    """`--dataset` as a local folder or file, or None when it names cifar10 or a dataset id."""
    if value == CIFAR10:
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def _known_dataset(settings: Settings, dataset_id: str) -> bool:
    return bool(_ID.match(dataset_id)) and open_dataset_store(settings).get(dataset_id) is not None


def _dataset_name(path: Path) -> str:
    name = path.resolve().name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return name[:64] or "dataset"


def pack_folder(folder: Path, archive: Path, skip: Path | None = None) -> int:
    """Write every file under `folder` (paths relative to it, sorted) into an uncompressed zip; returns the count.

    `skip` (the artifact store, when it lies inside `folder`) is left out, and so the archive being written."""
    count = 0
    skipped = {p.resolve() for p in (skip, archive) if p is not None}
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED, allowZip64=True,
                         strict_timestamps=False) as zf:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if (Path(root) / d).resolve() not in skipped)
            for name in sorted(files):
                path = Path(root) / name
                if path.is_file() and path.resolve() not in skipped:
                    zf.write(path, path.relative_to(folder).as_posix())
                    count += 1
    return count


def _place_archive(source: Path, upload: Path) -> None:
    """The archive at the store's upload path: a hard link where the file system allows, else a copy."""
    try:
        os.link(source, upload)
    except OSError:
        shutil.copyfile(source, upload)


def prepare_dataset(source: Path, settings: Settings, *, test_fraction: float, seed: int) -> str:
    """Process a local folder or archive into the artifact store, as POST /v1/datasets and the dataset worker do
    (a `processing` record beside its archive, then `process_dataset_now`); returns the id of the ready dataset.

    Raises DatasetFailed with the dataset's error (the failed record is removed). On Ctrl-C (KeyboardInterrupt)
    nothing of the dataset is kept."""
    from worker.dataset_tasks import process_dataset_now  # Celery's module, imported only for this (no broker)

    store = open_dataset_store(settings)
    dataset_id = new_dataset_id()
    try:
        with store.receiving(dataset_id) as upload:
            if source.is_dir():
                log.info("packing folder %s into an uncompressed zip for dataset %s", source, dataset_id)
                pack_folder(source, upload, skip=Path(settings.artifact_dir))
            else:
                _place_archive(source, upload)
        store.put(DatasetRecord(id=dataset_id, name=_dataset_name(source), status="processing",
                                created_at=utc_now(), test_fraction=test_fraction, seed=seed, bytes=0))
    except OSError as exc:
        raise DatasetFailed("ArtifactWriteError", f"cannot write the dataset into {store.location}: "
                                                  f"{exc.strerror or exc}") from exc
    log.info("processing %s as dataset %s (test_fraction %s, seed %d)", source, dataset_id, test_fraction, seed)
    try:
        status = process_dataset_now(dataset_id, settings)
    except BaseException:
        store.delete(dataset_id)
        raise
    record = store.get(dataset_id)
    if status == "ready" and record is not None and record.status == "ready":
        if record.skipped_count:
            first = record.skipped[0] if record.skipped else None
            log.warning("dataset %s: %d file(s) skipped%s", dataset_id, record.skipped_count,
                        f" (first: {first.path}: {first.reason})" if first else "")
        return dataset_id
    error = record.error if record is not None else None
    store.delete(dataset_id)
    if error is None:
        raise DatasetFailed("DatasetError", f"dataset {dataset_id} was not processed ({status})")
    raise DatasetFailed(error.type, f"dataset {source}: {error.message}")


class _InterruptReporter(LogReporter):
    """The command line's reporter: logs like LogReporter; the first Ctrl-C asks the engine to stop."""

    def __init__(self, total_epochs: int) -> None:
        super().__init__(total_epochs=total_epochs)
        self.interrupted = False

    def cancel_requested(self) -> bool:
        return self.interrupted


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    output = args.pop("output")
    dataset_arg: str = args.pop("dataset")
    test_fraction: float | None = args.pop("test_fraction")

    settings: Settings = get_settings()
    if output is not None:
        settings = settings.model_copy(update={"artifact_dir": output})
    source = _local_source(dataset_arg)
    if source is None and test_fraction is not None:
        parser.error("--test-fraction: only for a --dataset that is a local folder or archive")
    if source is None and dataset_arg != CIFAR10 and not _known_dataset(settings, dataset_arg):
        parser.error(f"--dataset {dataset_arg}: no such folder or archive, and no dataset of that id under "
                     f"{open_dataset_store(settings).location}")
    try:  # every flag is checked before a dataset is processed (a job on any uploaded dataset validates alike)
        spec = spec_from_args({**args, "dataset": _PENDING_ID if source is not None else dataset_arg})
    except ValidationError as exc:
        parser.print_usage(sys.stderr)
        print(format_validation_error(exc), file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if source is not None:
        try:
            dataset_id = prepare_dataset(source, settings, test_fraction=test_fraction or 0.2, seed=spec.seed)
        except DatasetFailed as exc:
            print(f"{exc.type}: {exc}", file=sys.stderr)
            return EXIT_USAGE if exc.type == "InvalidDataset" else EXIT_ERROR
        except KeyboardInterrupt:
            print("cancelled: interrupted while processing the dataset; nothing was kept", file=sys.stderr)
            return EXIT_INTERRUPTED
        spec = spec_from_args({**args, "dataset": dataset_id})

    reporter = _InterruptReporter(spec.total_epochs)

    def on_sigint(signum: int, frame: Any) -> None:
        if reporter.interrupted:
            raise KeyboardInterrupt
        reporter.interrupted = True
        logging.getLogger("worker.cli").warning("interrupted: stopping at the next batch (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        from worker.engine.pipeline import train_job

        result = train_job(spec, settings, reporter)
    except InvalidSpec as exc:
        print(f"invalid job: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobCancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingError as exc:
        print(f"{exc.type}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGINT, previous)
    line = {**result.metrics.model_dump(mode="json"), "model_id": result.model_id, "model_dir": str(result.model_dir),
            "dataset_id": spec.dataset}
    print(json.dumps(line), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
