"""Writing a trained model's files: model.keras, and model.tflite when it agrees with the Keras model.

The TensorFlow Lite export is float32 with a dynamic batch dimension. It is checked on the job's own test
images against the Keras model's probabilities: the top-1 class must be identical on at least 99.9 % of them
and no probability may differ by more than 1e-3. If the conversion or the check fails, no .tflite is shipped
and the reason is recorded in metadata["export"]; the job itself still succeeds.

A full conversion converts the whole frozen MobileNetV2 base again. When the caller passes an `ExportTemplate`,
a converted model that passed its check is kept as a template: its flatbuffer bytes and where the values of the
head's Dense weights lie in them. A later model with the same key, the same frozen weights and the same head
shapes is then written by copying the template and overwriting those byte ranges with its own head weights; the
result is checked exactly like a converted model, and a patched model that fails the check is dropped in favour
of a full conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.litert import run_batches
from worker.store import KERAS_FILE, TFLITE_FILE, write_atomic

log = logging.getLogger(__name__)

MIN_TOP1_AGREEMENT = 0.999
MAX_PROB_DIFF = 1e-3
CHECK_BATCH = 64  # XNNPACK prefers small batches (bench/README.md)
TEMPLATE_PATCH = "template_patch"  # record["conversion"] of a model patched from a template
MAX_TEMPLATES = 4
TEMPLATE_SUFFIX = ".tflite-template"
TEMPLATE_FORMAT = 1
STALE_TMP_SECONDS = 3600.0


def save_keras(model: Any, directory: Path) -> Path:
    """Save `model` as model.keras in `directory`; returns its path."""
    path = directory / KERAS_FILE
    model.save(path)
    return path


def convert_tflite(model: Any) -> tuple[bytes, str]:
    """Float32 TFLite bytes of `model`, with a dynamic batch dimension, and the conversion path used."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    shape = [None, *model.input_shape[1:]]
    try:
        # Freezing the inference function first skips from_keras_model's SavedModel round trip (faster).
        fn = tf.function(lambda x: model(x, training=False),
                         input_signature=[tf.TensorSpec(shape, tf.float32, name="image")])
        frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
        with _quiet():
            converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            return converter.convert(), "frozen_concrete_function"
    except Exception as exc:  # fall back to the SavedModel path, which handles more graphs
        log.warning("frozen-function TFLite conversion failed (%s); trying from_keras_model", exc)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with _quiet():
        return converter.convert(), "from_keras_model"


@contextlib.contextmanager
def _quiet() -> Any:
    # The converter prints the exported SavedModel's signature (hundreds of lines) to stdout, and the CLI's
    # last stdout line must stay its JSON result; its absl notices ("deprecated conversion path", "new
    # converter") are about TensorFlow's internals, not this model.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class ExportTemplate:
    """Where and under which key an export may reuse an earlier conversion, and the layers it patches.

    The key must change whenever anything but the weights of `patch_layers` (the head's Dense layers) changes
    the converted model: image size, alpha, head layout, TensorFlow version.
    """

    directory: Path
    key: str
    patch_layers: tuple[str, ...]


class TemplateUnusable(Exception):
    """A stored template cannot be used for (or made from) this model; the message says why."""


@dataclass(frozen=True)
class WeightPatch:
    """Where one head weight's float32 values lie in a converted flatbuffer."""

    layer: str
    weight: str  # the variable's name in its layer: "kernel", "bias"
    shape: tuple[int, ...]  # as in Keras
    offset: int
    transposed: bool  # stored as the transpose (TFLite FULLY_CONNECTED keeps the kernel as [out, in])

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape, dtype=np.int64))


def _head_weights(model: Any, layers: Sequence[str]) -> list[tuple[str, str, Any]]:
    """(layer, weight name, variable) of every weight of `layers`, in order."""
    out = []
    for name in layers:
        try:
            layer = model.get_layer(name)
        except ValueError as exc:
            raise TemplateUnusable(f"the model has no layer {name!r}") from exc
        if not layer.weights:
            raise TemplateUnusable(f"layer {name!r} has no weights")
        for variable in layer.weights:
            if variable.dtype != "float32" or len(variable.shape) not in (1, 2):
                raise TemplateUnusable(f"{name}/{variable.name} is {variable.dtype} {tuple(variable.shape)}; "
                                       "only float32 vectors and matrices are patched")
            out.append((name, variable.name, variable))
    return out


def _float32_bytes(value: Any, transposed: bool) -> bytes:
    array = np.asarray(value, dtype="<f4")
    return np.ascontiguousarray(array.T if transposed else array).tobytes()


def _frozen_weights_sha256(model: Any, head: list[tuple[str, str, Any]]) -> str:
    """Digest of every weight outside the head; refuses a model whose other weights are trainable."""
    patched = {id(variable) for _, _, variable in head}
    trainable = [v.path for v in model.trainable_weights if id(v) not in patched]
    if trainable:
        # e.g. a fine-tuned base: its weights differ from job to job, so a template of it would never match.
        raise TemplateUnusable(f"{len(trainable)} trainable weight(s) outside the patched layers, e.g. {trainable[0]}")
    digest = hashlib.sha256()
    for variable in model.weights:
        if id(variable) not in patched:
            value = np.ascontiguousarray(variable.numpy())
            digest.update(f"{value.dtype.str}{value.shape};".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def locate_weights(content: bytes, model: Any, layers: Sequence[str]) -> list[WeightPatch]:
    """Where each weight of `layers` lies in `content` (a conversion of `model`); TemplateUnusable if unsure.

    Each weight's float32 bytes, as is or transposed, must occur exactly once in the whole flatbuffer and the
    ranges must not overlap; otherwise (values folded into something else, quantised, shared or repeated) no
    template is made.
    """
    patches: list[WeightPatch] = []
    for layer, weight, variable in _head_weights(model, layers):
        value = variable.numpy()
        hits: list[tuple[int, bool]] = []
        # A vector, or a matrix with a dimension of 1, has the same bytes transposed or not.
        forms = (True, False) if value.ndim == 2 and 1 not in value.shape else (False,)
        for transposed in forms:
            needle = _float32_bytes(value, transposed)
            first = content.find(needle)
            while first != -1 and len(hits) < 2:
                hits.append((first, transposed))
                first = content.find(needle, first + 1)
        if len(hits) != 1:
            raise TemplateUnusable(f"{layer}/{weight}: its values occur {'more than once' if hits else 'nowhere'} "
                                   "in the converted model")
        offset, transposed = hits[0]
        patches.append(WeightPatch(layer, weight, tuple(int(d) for d in value.shape), offset, transposed))
    ranges = sorted((p.offset, p.offset + p.nbytes) for p in patches)
    if any(end > start for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False)):
        raise TemplateUnusable("the head weights' byte ranges overlap")
    return patches


class TfliteTemplates:
    """A small directory of converted models to patch with new head weights instead of converting again.

    One file per key: a JSON manifest line, then the flatbuffer. The manifest names the key, the TensorFlow
    version, the model's input/output shapes, a digest of every weight outside the head, the flatbuffer's
    digest, and a `WeightPatch` per head weight. A file that is missing, unreadable or does not match the model
    just means a full conversion. Files are written atomically; the newest `max_entries` (by use) are kept.
    """

    def __init__(self, directory: Path, max_entries: int = MAX_TEMPLATES) -> None:
        self.directory = Path(directory)
        self.max_entries = max_entries

    def path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + TEMPLATE_SUFFIX)

    def patch(self, key: str, model: Any, layers: Sequence[str]) -> bytes | None:
        """`model` as TFLite bytes from the template of `key`, or None if there is none.

        Raises TemplateUnusable when the template exists but does not fit `model` (or is corrupt).
        """
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TemplateUnusable(f"unreadable: {exc}") from exc
        manifest, content = _parse_template(raw)
        head = _head_weights(model, layers)
        for field, value in _model_identity(key, model, head).items():
            if manifest.get(field) != value:
                raise TemplateUnusable(f"{field} differs: template {manifest.get(field)!r}, model {value!r}"[:300])
        try:
            patches = [WeightPatch(p["layer"], p["weight"], tuple(p["shape"]), int(p["offset"]), bool(p["transposed"]))
                       for p in manifest["patches"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateUnusable(f"corrupt manifest: {exc!r}") from exc
        wanted = [(layer, weight, tuple(int(d) for d in variable.shape)) for layer, weight, variable in head]
        if [(p.layer, p.weight, p.shape) for p in patches] != wanted:
            raise TemplateUnusable(f"head weights differ: template {[(p.layer, p.weight, p.shape) for p in patches]}, "
                                   f"model {wanted}"[:300])
        if any(p.offset < 0 or p.offset + p.nbytes > len(content) for p in patches):
            raise TemplateUnusable("corrupt manifest: a weight lies outside the flatbuffer")
        patched = bytearray(content)
        for p, (_, _, variable) in zip(patches, head, strict=True):
            patched[p.offset:p.offset + p.nbytes] = _float32_bytes(variable.numpy(), p.transposed)
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: eviction goes by mtime
        return bytes(patched)

    def store(self, key: str, model: Any, layers: Sequence[str], content: bytes, conversion: str) -> Path:
        """Keep `content` (a checked conversion of `model`) as the template of `key`; evict beyond the bound.

        Raises TemplateUnusable when the head weights cannot be located unambiguously, OSError on write errors.
        """
        head = _head_weights(model, layers)
        manifest = {**_model_identity(key, model, head), "conversion": conversion, "content_bytes": len(content),
                    "content_sha256": hashlib.sha256(content).hexdigest(),
                    "patches": [asdict(p) for p in locate_weights(content, model, layers)]}
        path = self.path(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(json.dumps(manifest).encode() + b"\n" + content))
        self.evict(keep=path)
        return path

    def drop(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def entries(self) -> list[Path]:
        """Template files, newest first."""
        try:
            found = [(entry.stat().st_mtime, Path(entry.path)) for entry in os.scandir(self.directory)
                     if entry.name.endswith(TEMPLATE_SUFFIX) and not entry.name.startswith(".")]
        except FileNotFoundError:
            return []
        return [path for _, path in sorted(found, reverse=True)]

    def evict(self, keep: Path | None = None) -> None:
        """Remove all but the newest `max_entries` templates (always keeping `keep`), and stale temporary files."""
        for path in [p for p in self.entries() if p != keep][max(self.max_entries - 1, 0):]:
            path.unlink(missing_ok=True)
            log.info("TFLite templates: evicted %s", path.name)
        for tmp in self.directory.glob(f".*{TEMPLATE_SUFFIX}.*.tmp"):  # left by a writer that died
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()


def _model_identity(key: str, model: Any, head: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """The manifest fields a model must match to use a template (besides its head weights' shapes)."""
    import tensorflow as tf

    return {"format": TEMPLATE_FORMAT, "key": key, "tensorflow": tf.__version__,
            "input_shape": list(model.input_shape), "output_shape": list(model.output_shape),
            "frozen_weights_sha256": _frozen_weights_sha256(model, head)}


def _parse_template(raw: bytes) -> tuple[dict[str, Any], bytes]:
    header, newline, content = raw.partition(b"\n")
    try:
        manifest = json.loads(header) if newline else None
    except ValueError as exc:
        raise TemplateUnusable(f"corrupt manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise TemplateUnusable("corrupt manifest: no JSON object")
    if manifest.get("content_bytes") != len(content) or (
            manifest.get("content_sha256") != hashlib.sha256(content).hexdigest()):
        raise TemplateUnusable("corrupt template: the flatbuffer does not match its manifest")
    return manifest, content


def export_tflite(model: Any, images: np.ndarray, keras_probs: np.ndarray, directory: Path, *,
                  template: ExportTemplate | None = None, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Convert, check against `keras_probs` on `images`, write model.tflite if it passes; the check's record.

    With a `template`, the model is first made by patching the key's stored conversion (`TfliteTemplates`)
    with its head weights; that model goes through the same check, and if it fails, the template is dropped and
    the model converted in full. A full conversion that passes becomes the key's template. record["conversion"]
    says which way the shipped bytes were made, record["template"] what happened to the template. The frozen
    weights and the head's shapes are verified against the template in any case.
    """
    record: dict[str, Any] = {"format": "tflite", "file": None, "dtype": "float32", "check_images": len(images),
                              "min_top1_agreement": MIN_TOP1_AGREEMENT, "max_prob_diff_allowed": MAX_PROB_DIFF}
    if template is not None:
        content = _patch_and_check(template, model, images, keras_probs, record, labels)
        if content is not None:
            return _write_tflite(content, directory, record)
    started = time.perf_counter()
    try:
        content, how = convert_tflite(model)
        record["conversion"] = how
        record["convert_seconds"] = round(time.perf_counter() - started, 3)
        record.update(_check(content, images, keras_probs, labels))
    except Exception as exc:  # an export problem must not fail the training job: record it, ship no .tflite
        log.warning("TFLite export failed: %s: %s", type(exc).__name__, exc)
        record.update(passed=False, reason=f"conversion or inference failed: {type(exc).__name__}: {exc}")
        return record
    if not record["passed"]:
        record["reason"] = _disagreement(record)
        log.warning("not shipping model.tflite: %s", record["reason"])
        return record
    if template is not None:
        record["template"].update(_store_template(template, model, content, how))
    return _write_tflite(content, directory, record)


def _check(content: bytes, images: np.ndarray, keras_probs: np.ndarray,
           labels: np.ndarray | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    probs = run_batches(content, images, batch_size=CHECK_BATCH)
    seconds = round(time.perf_counter() - started, 3)
    agreement = float(np.mean(probs.argmax(axis=1) == keras_probs.argmax(axis=1)))
    max_diff = float(np.max(np.abs(probs - keras_probs)))
    passed = bool(agreement >= MIN_TOP1_AGREEMENT and max_diff <= MAX_PROB_DIFF)
    check = {"check_seconds": seconds, "top1_agreement": agreement, "max_prob_diff": max_diff, "passed": passed}
    if labels is not None:
        check["test_accuracy"] = float(np.mean(probs.argmax(axis=1) == np.asarray(labels)))
    return check


def _disagreement(check: dict[str, Any]) -> str:
    return (f"TFLite disagrees with the Keras model on the test images: top-1 agreement "
            f"{check['top1_agreement']:.4f} (needs {MIN_TOP1_AGREEMENT}), max |prob diff| "
            f"{check['max_prob_diff']:.2e} (allowed {MAX_PROB_DIFF:.0e})")


def _write_tflite(content: bytes, directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    (directory / TFLITE_FILE).write_bytes(content)
    record["file"] = TFLITE_FILE
    record["bytes"] = len(content)
    return record


def _patch_and_check(template: ExportTemplate, model: Any, images: np.ndarray, keras_probs: np.ndarray,
                     record: dict[str, Any], labels: np.ndarray | None = None) -> bytes | None:
    """The model patched from the key's template if that passes the check (filling `record`), else None."""
    templates, key, layers = TfliteTemplates(template.directory), template.key, template.patch_layers
    started = time.perf_counter()
    try:
        content = templates.patch(key, model, layers)
    except TemplateUnusable as exc:
        log.info("TFLite template %s not used: %s", templates.path(key).name, exc)
        record["template"] = {"status": "unusable", "reason": str(exc)}
        return None
    except Exception as exc:  # templates only save time: any other trouble with one means a full conversion
        log.warning("TFLite template %s not used: %s: %s", templates.path(key).name, type(exc).__name__, exc)
        record["template"] = {"status": "unusable", "reason": f"{type(exc).__name__}: {exc}"}
        return None
    if content is None:
        record["template"] = {"status": "missing"}
        return None
    patch_seconds = round(time.perf_counter() - started, 3)
    try:
        check = _check(content, images, keras_probs, labels)
        reason = None if check["passed"] else _disagreement(check)
    except Exception as exc:  # a patched flatbuffer LiteRT cannot run: convert instead
        reason = f"inference failed: {type(exc).__name__}: {exc}"
    if reason is not None:
        log.warning("patched TFLite model rejected, dropping its template and converting: %s", reason)
        record["template"] = {"status": "rejected", "reason": reason}
        templates.drop(key)
        return None
    record.update(conversion=TEMPLATE_PATCH, convert_seconds=patch_seconds, **check)
    record["template"] = {"status": "patched"}
    return content


def _store_template(template: ExportTemplate, model: Any, content: bytes, conversion: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        TfliteTemplates(template.directory).store(template.key, model, template.patch_layers, content, conversion)
    except TemplateUnusable as exc:
        log.info("no TFLite template kept for this model: %s", exc)
        return {"stored": False, "store_reason": str(exc)}
    except Exception as exc:  # a full disk, say: templates only save time, never fail the export over one
        log.warning("could not keep a TFLite template: %s: %s", type(exc).__name__, exc)
        return {"stored": False, "store_reason": f"{type(exc).__name__}: {exc}"}
    return {"stored": True, "store_seconds": round(time.perf_counter() - started, 3)}
