"""Run one training job from the command line, with no Redis or Celery.

    python -m worker.cli --model transfer --train-samples 5000 --epochs 10 --output ./artifacts

Every field of the job body (shared/API.md, `POST /v1/jobs`) is a `--kebab-case` flag, validated by the same
`JobCreate` as the API (so the same messages). `--output DIR` overrides TL_ARTIFACT_DIR. Progress goes to stderr;
the last stdout line is one JSON object: the job's metrics plus "model_id" and "model_dir".
Exit status: 0 done, 2 bad arguments (or a spec the data cannot satisfy), 1 training error, 130 interrupted
(Ctrl-C stops the job at its next cancel check and keeps no model).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.config import Settings, get_settings
from worker.engine.pipeline import LogReporter  # no TensorFlow at import: argument errors stay fast
from worker.errors import InvalidSpec, JobCancelled, TrainingError
from worker.spec import JobCreate

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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
        else:
            parser.add_argument(_flag(name), default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)
    parser.add_argument("--output", type=Path, default=None, metavar="DIR",
                        help="artifact directory to write the model into (overrides TL_ARTIFACT_DIR)")
    return parser


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
    try:
        spec = spec_from_args(args)
    except ValidationError as exc:
        parser.print_usage(sys.stderr)
        print(format_validation_error(exc), file=sys.stderr)
        return EXIT_USAGE

    settings: Settings = get_settings()
    if output is not None:
        settings = settings.model_copy(update={"artifact_dir": output})
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

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
    line = {**result.metrics.model_dump(mode="json"), "model_id": result.model_id, "model_dir": str(result.model_dir)}
    print(json.dumps(line), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
