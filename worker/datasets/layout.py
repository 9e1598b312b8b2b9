"""Which class (and which split, if the archive says) each file of an archive belongs to.

Three layouts, recognised from the paths alone (after an optional single wrapping folder, `flowers/...`):
1. a `labels.csv` at the top, columns `filename,label[,split]` (a header row names them; paths are relative
   to the csv; other columns are ignored). Files it does not list are skipped.
2. `train/` plus `test/` (or `val/`, `validation/`: all three are the test split), each holding one folder per
   class: the split is kept as given. A `train/` alone is read as class folders whose split is then drawn.
3. one folder per class: `roses/001.jpg`; deeper folders belong to their top folder's class.
Operating-system clutter is ignored without being reported: `__MACOSX/`, `.DS_Store`, `Thumbs.db`,
`desktop.ini` and every hidden file or folder (a name starting with "."). Class names are folder names (or
labels) as they are: `Roses` and `roses` are two classes.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from worker.datasets.errors import DatasetError
from worker.datasets.limits import Limits

Split = Literal["train", "test"]

LABELS_CSV = "labels.csv"
SPLIT_FOLDERS: dict[str, Split] = {"train": "train", "test": "test", "val": "test", "validation": "test"}
_JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini"})
_SPLIT_VALUES: dict[str, Split] = {**SPLIT_FOLDERS, "training": "train", "testing": "test"}


def is_junk(path: str) -> bool:
    """System clutter (macOS resource forks, Windows thumbnails, hidden files): ignored, not reported."""
    return any(part.startswith(".") or part.lower() in _JUNK_NAMES for part in path.split("/"))


def may_be_labels_csv(path: str) -> bool:
    """A labels.csv that could be the archive's own: at the top, or inside a single wrapping folder."""
    return posixpath.basename(path).lower() == LABELS_CSV and path.count("/") <= 1


@dataclass(frozen=True)
class Placement:
    label: str
    #: None: the archive gives no split, so it is drawn.
    split: Split | None


@dataclass
class Layout:
    """Where each path goes: a Placement, or the reason it is skipped."""

    description: str
    placements: dict[str, Placement | str]
    #: Every class the layout names, including any whose files all turn out unusable.
    classes: set[str]
    given_split: bool
    #: (path, reason) for what the layout itself skips without a file behind it (rows naming missing files).
    extra_skips: list[tuple[str, str]] = field(default_factory=list)
    #: The labels.csv paths that were not used as the archive's labels (reported as skipped).
    unused_csvs: list[str] = field(default_factory=list)


def resolve_layout(paths: Iterable[str], csvs: Mapping[str, bytes], limits: Limits) -> Layout:
    """The layout of an archive whose (non-clutter) files are `paths`; `csvs` holds the candidate labels.csv files."""
    paths = list(paths)
    prefix = _wrapping_folder(paths, csvs)
    csv_path = next((p for p in csvs if p.lower() == (prefix + LABELS_CSV).lower()), None)
    unused = [p for p in csvs if p != csv_path]
    rel = {path: path[len(prefix):] for path in paths}
    if csv_path is not None:
        layout = _csv_layout(rel, _parse_labels_csv(csvs[csv_path], limits), csv_path)
    else:
        layout = _folder_layout(rel)
    layout.unused_csvs = unused
    return layout


def _wrapping_folder(paths: list[str], csvs: Mapping[str, bytes]) -> str:
    tops = {p.split("/", 1)[0] for p in [*paths, *csvs]}
    if len(tops) != 1:
        return ""
    (top,) = tops
    if top.lower() in SPLIT_FOLDERS or not any("/" in p for p in paths):
        return ""
    wrapped_csv = any(p.lower() == f"{top}/{LABELS_CSV}".lower() for p in csvs)
    if wrapped_csv or any(p.count("/") >= 2 for p in paths):
        return top + "/"
    return ""  # top/file only: one class folder, not a wrapper


def _folder_layout(rel: Mapping[str, str]) -> Layout:
    split_tops = {r.split("/", 1)[0].lower() for r in rel.values() if "/" in r} & set(SPLIT_FOLDERS)
    placements: dict[str, Placement | str] = {}
    if not split_tops:
        for path, r in rel.items():
            placements[path] = (Placement(r.split("/", 1)[0], None) if "/" in r
                                else "not inside a class folder (expected <class>/<file>)")
        return _layout("class folders", placements, given_split=False)
    if "train" not in split_tops:
        found = ", ".join(sorted(f"{name}/" for name in split_tops))
        raise DatasetError(f"found {found} but no train/ folder: put the training images in train/<class>/ "
                           "(and the test images in test/<class>/), or use one folder per class without train/ "
                           "and test/ so that the split is drawn")
    given = len(split_tops) > 1
    for path, r in rel.items():
        top, _, rest = r.partition("/")
        if top.lower() not in SPLIT_FOLDERS:
            placements[path] = "outside the train/ and test/ folders"
        elif "/" not in rest:
            placements[path] = f"not inside a class folder (expected {top}/<class>/<file>)"
        else:
            placements[path] = Placement(rest.split("/", 1)[0], SPLIT_FOLDERS[top.lower()] if given else None)
    return _layout("train/ and test/ folders" if given else "class folders under train/", placements, given)


def _layout(description: str, placements: dict[str, Placement | str], given_split: bool) -> Layout:
    classes = {p.label for p in placements.values() if isinstance(p, Placement)}
    return Layout(description, placements, classes, given_split)


def _csv_layout(rel: Mapping[str, str], rows: dict[str, Placement], csv_path: str) -> Layout:
    placements: dict[str, Placement | str] = {}
    for path, r in rel.items():
        placements[path] = rows.get(r, f"not listed in {csv_path}")
    layout = _layout(csv_path, placements, given_split=any(p.split is not None for p in rows.values()))
    layout.classes = {p.label for p in rows.values()}
    present = set(rel.values())
    base = csv_path[:-len(LABELS_CSV)]
    layout.extra_skips = [(base + name, f"listed in {csv_path} but not in the archive")
                          for name in rows if name not in present]
    return layout


def _parse_labels_csv(data: bytes, limits: Limits) -> dict[str, Placement]:
    """filename -> Placement; every row gets a split when the csv has a split column, none otherwise."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"labels.csv is not UTF-8 text ({exc}); save it as UTF-8") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [column.strip().lower() for column in next(reader, [])]
        if "filename" not in header or "label" not in header:
            raise DatasetError("labels.csv must start with a header row naming its columns: filename,label "
                               f"(and optionally split); its first row is {','.join(header)!r}")
        name_at, label_at = header.index("filename"), header.index("label")
        split_at = header.index("split") if "split" in header else None
        rows: dict[str, Placement] = {}
        for number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(rows) >= limits.max_files:
                raise DatasetError(f"labels.csv has more than {limits.max_files} rows, the most accepted")
            cells = [*row, *[""] * len(header)]
            name = posixpath.normpath(cells[name_at].strip().replace("\\", "/")).lstrip("/")
            label = cells[label_at].strip()
            if not cells[name_at].strip() or not label:
                raise DatasetError(f"labels.csv row {number} needs both a filename and a label")
            split: Split | None = None
            if split_at is not None:
                value = cells[split_at].strip().lower()
                if value not in _SPLIT_VALUES:
                    raise DatasetError(f"labels.csv row {number}: split is {cells[split_at].strip()!r}; "
                                       "it must be train or test")
                split = _SPLIT_VALUES[value]
            placement = Placement(label, split)
            if rows.setdefault(name, placement) != placement:
                raise DatasetError(f"labels.csv lists {name!r} twice, with different labels or splits; "
                                   "keep one row per file")
    except csv.Error as exc:
        raise DatasetError(f"labels.csv is not valid CSV ({exc}); save it as comma-separated text") from exc
    if not rows:
        raise DatasetError("labels.csv lists no files; add one row per image: filename,label")
    return rows
