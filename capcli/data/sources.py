"""Readers for the real data sources: each turns its input into a list of :class:`Record`.

* :func:`coco_records` - the official COCO caption annotation files (2014 or 2017) read with
  pycocotools, split by a Karpathy split file when one is given.
* :func:`karpathy_records` - a Karpathy split file (``dataset_coco.json``, ``dataset_flickr8k.json``,
  ``dataset_flickr30k.json``): images, splits and raw sentences in one JSON.
* :func:`folder_records` - your own photos: a CSV/TSV/JSONL file with one row per (image, caption)
  and an optional split column.

Default split (used whenever a source gives an image no split)
--------------------------------------------------------------
:func:`hash_split`: the first 8 hex digits of the SHA-1 of the image's *key*, modulo 100: 0-89 train,
90-94 val, 95-99 test. The key is the COCO image id (so 2014 and 2017 files of the same photo get
the same split) or, for a folder, the image path as the captions file writes it. An image's split
depends on its key alone, so adding images never moves an existing one. Tiny sets only: when the
rule leaves val or test empty and there are at least 3 images, the train images with the highest
hash values fill the empty split(s).

Every reader raises :class:`capcli.errors.UserError` with the file (and line) at fault for inputs
a user can fix, and returns records in a deterministic order.

Captions with no words (empty, or only punctuation such as ``...``) are dropped and counted; an
image left without a caption is left out and counted (``left_out`` in the manifest).

Image paths stay under the image root: a path a captions file writes that leads out of it
(``../../etc/passwd``, an absolute path elsewhere) becomes an :class:`OutsideRoot` source, which
``prepare`` skips (reason "outside the image root") without opening it. The check is on the path
as written, with ``..`` resolved but not symlinks: a symlink inside the root was put there by its
owner and may point anywhere (datasets are often linked in).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from capcli.data.records import OutsideRoot, Record
from capcli.errors import UserError
from capcli.text import tokenize

SPLIT_RULE = ("sha1(key)[:8] mod 100: 0-89 train, 90-94 val, 95-99 test; key = COCO image id, "
              "or the image path as written in the captions file (folder), or the file name (Karpathy "
              "images without a split); stable when images are added")

# Spellings of split names accepted in inputs -> the split written.
SPLIT_ALIASES = {"train": "train", "restval": "train", "training": "train", "val": "val",
                 "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test"}

IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "image_path", "path")
CAPTION_COLUMNS = ("caption", "text", "sentence", "raw")


def has_words(caption: str) -> bool:
    """True when the caption has a token left after tokenisation (not empty, not only punctuation)."""
    if any(ch.isalnum() for ch in caption):
        return True
    return bool(caption.strip()) and bool(tokenize(caption))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def image_source(root: Path, name: str, base: Path | None = None) -> str | OutsideRoot:
    """The file an image path from a captions file names: ``base / name`` (``base`` defaults to
    ``root``; an absolute ``name`` as it is), or an :class:`OutsideRoot` when it leads out of
    ``root``. Checked as written: ``..`` is resolved, symlinks are not (see the module doc); an
    absolute path also counts as inside when its real path is inside the root's real path."""
    folder = base if base is not None else root
    target = Path(name) if os.path.isabs(name) else folder / name
    top = os.path.normpath(os.path.abspath(root))
    if _inside(os.path.normpath(os.path.abspath(target)), top):
        return str(target)
    if os.path.isabs(name) and _inside(os.path.realpath(target), os.path.realpath(top)):
        return str(target)
    return OutsideRoot(str(target), str(root))


def _hash_value(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)


def hash_split(key: str) -> str:
    """The default split of an image from its key: 90% train, 5% val, 5% test."""
    bucket = _hash_value(key) % 100
    return "train" if bucket < 90 else ("val" if bucket < 95 else "test")


def assign_default_splits(records: list[Record], keys: dict[int, str]) -> None:
    """Give the records listed in ``keys`` (position -> key) their hash split; in tiny sets make
    sure val and test get at least one image (taken from train, highest hash first)."""
    for pos, key in keys.items():
        records[pos].split = hash_split(key)
    if len(records) < 3:
        return
    present = {r.split for r in records}
    for missing in ("val", "test"):
        if missing in present:
            continue
        movable = sorted((pos for pos in keys if records[pos].split == "train"),
                         key=lambda p: (_hash_value(keys[p]), keys[p]), reverse=True)
        if len([r for r in records if r.split == "train"]) > 1 and movable:
            records[movable[0]].split = missing
            present.add(missing)


def normalise_split(value: Any, where: str) -> str | None:
    """'restval' -> 'train', 'validation' -> 'val', ...; empty -> None; anything else: UserError."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    if text not in SPLIT_ALIASES:
        raise UserError(f"{where}: unknown split {value!r}; use train, restval, val or test")
    return SPLIT_ALIASES[text]


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}); is it the right file?") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({_bad_byte(exc)}), so not a {what}; save it as UTF-8") from exc


def _bad_byte(exc: UnicodeDecodeError) -> str:
    try:
        return f"byte 0x{exc.object[exc.start]:02x} is not UTF-8"
    except (IndexError, TypeError):
        return exc.reason


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> UserError:
    return UserError(f"{path}: not UTF-8 text ({_bad_byte(exc)}); save it as UTF-8, e.g. "
                     f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`, and pass that file")


def _require_some_exist(records: list[Record], source_file: Path, root: Path, hint: str = "") -> None:
    """A source that names no existing image is a path mistake, not a data problem: say so."""
    if not records:
        return
    inside = [r for r in records if not isinstance(r.source, OutsideRoot)]
    if not inside:
        raise UserError(f"every image named in {source_file} is outside the image root {root} (e.g. "
                        f"{records[0].file_name}); image paths must be relative to --images and stay inside it")
    if any(os.path.exists(r.source) for r in inside):
        return
    example = inside[0].source
    raise UserError(f"none of the {len(records)} images named in {source_file} exist under {root} "
                    f"(looked for e.g. {example}); check --images{hint}")


# --------------------------------------------------------------------------------------------- COCO

def _coco_annotation_files(annotations: Path) -> list[Path]:
    if annotations.is_file():
        return [annotations]
    if not annotations.is_dir():
        raise UserError(f"annotations dir {annotations} does not exist; point --annotations at the COCO "
                        "'annotations' folder (with captions_train2014.json, captions_val2014.json)")
    files = sorted(annotations.glob("captions_*.json"))
    if not files:
        found = ", ".join(sorted(p.name for p in annotations.glob("*.json"))[:6]) or "no JSON files"
        raise UserError(f"{annotations} holds no COCO caption files (captions_train2014.json, "
                        f"captions_val2014.json, or the 2017 ones); it has: {found}")
    years = {y for f in files for y in ("2014", "2017") if y in f.name}
    if len(years) > 1:
        raise UserError(f"{annotations} holds caption files of both 2014 and 2017 "
                        f"({', '.join(f.name for f in files)}), which describe the same photos; point "
                        "--annotations at one file or at a dir with one year's files")
    return files


def _load_coco(path: Path):
    from pycocotools.coco import COCO

    data = _load_json(path, "COCO annotation file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UserError(f"{path} is not a COCO caption annotation file (it needs 'images' and "
                        "'annotations'); use the captions_*.json files")
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise UserError(f"{path}: '{key}' must be a list, got a {type(data[key]).__name__}; is it a COCO "
                            "captions_*.json file?")
    anns = data["annotations"]
    if anns and isinstance(anns[0], dict) and "caption" not in anns[0] and "image_id" in anns[0]:
        raise UserError(f"{path} holds annotations without captions (instances or keypoints?); "
                        "use the captions_*.json files")
    _check_coco(path, data["images"], anns)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; libraries don't
        coco.createIndex()
    return coco


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_coco(path: Path, images: list, anns: list) -> None:
    """One-line errors for the entries pycocotools would choke on or silently merge."""
    fix = "fix the file, or use the official captions_*.json"
    ids: set[int] = set()
    for n, img in enumerate(images):
        where = f"{path}, images[{n}]"
        if not isinstance(img, dict):
            raise UserError(f"{where}: expected an object with 'id' and 'file_name', got a {type(img).__name__}")
        if not _is_int(img.get("id")):
            raise UserError(f"{where}: 'id' must be an integer, got {img.get('id')!r}; {fix}")
        if img["id"] in ids:
            raise UserError(f"{where}: image id {img['id']} appears twice; each image is listed once ({fix})")
        ids.add(img["id"])
        if img.get("file_name") is not None and not isinstance(img["file_name"], str):
            raise UserError(f"{where}: 'file_name' must be a string, got {img['file_name']!r}; {fix}")
    ann_ids: set[int] = set()
    for n, ann in enumerate(anns):
        where = f"{path}, annotations[{n}]"
        if not isinstance(ann, dict):
            raise UserError(f"{where}: expected an object with 'id', 'image_id' and 'caption', got a "
                            f"{type(ann).__name__}")
        missing = [k for k in ("id", "image_id", "caption") if k not in ann]
        if missing:
            raise UserError(f"{where}: no {', '.join(repr(k) for k in missing)}; every caption annotation needs "
                            f"'id', 'image_id' and 'caption' ({fix})")
        for key in ("id", "image_id"):
            if not _is_int(ann[key]):
                raise UserError(f"{where}: '{key}' must be an integer, got {ann[key]!r}; {fix}")
        if not isinstance(ann["caption"], str):
            raise UserError(f"{where}: 'caption' must be a string, got a {type(ann['caption']).__name__}; {fix}")
        if ann["id"] in ann_ids:
            raise UserError(f"{where}: annotation id {ann['id']} appears twice; each caption has its own id ({fix})")
        ann_ids.add(ann["id"])


def _image_dir(root: Path, ann_file: Path) -> Path:
    """captions_val2014.json -> ROOT/val2014 when that folder exists, else ROOT itself."""
    stem = ann_file.stem
    name = stem[len("captions_"):] if stem.startswith("captions_") else ""
    return root / name if name and (root / name).is_dir() else root


def karpathy_splits(path: Path) -> dict[int, str]:
    """cocoid -> split from a Karpathy ``dataset_coco.json`` (restval counted as train)."""
    data = _load_json(Path(path), "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} is not a Karpathy split file (no 'images' list)")
    out: dict[int, str] = {}
    for n, img in enumerate(data["images"]):
        where = f"{path}, images[{n}]"
        if not isinstance(img, dict) or "split" not in img:
            raise UserError(f"{where}: no 'split'; is this a Karpathy dataset_*.json file?")
        key = img.get("cocoid", img.get("id"))
        if key is None:
            raise UserError(f"{where}: no 'cocoid'; --karpathy needs dataset_coco.json, not a Flickr file "
                            "(use `capcli prepare karpathy` for those)")
        out[int(key)] = normalise_split(img["split"], where) or "train"
    return out


def coco_records(images: str | Path, annotations: str | Path, karpathy: str | Path | None = None,
                 info: dict | None = None) -> list[Record]:
    """Records from official COCO caption files (a dir of captions_*.json, or one file).

    Images are looked up in ``ROOT/<train2014|val2014|...>/`` (from the annotation file's name) or
    directly in ``ROOT``. With ``karpathy`` the splits come from that file by COCO id (restval ->
    train) and images it does not list are left out; otherwise :func:`hash_split` on the image id.
    ``info`` (if given) receives what the manifest should say about the source.
    """
    root = Path(images).expanduser()
    if not root.is_dir():
        raise UserError(f"images root {root} does not exist; point --images at the folder holding "
                        "train2014/ and val2014/ (or train2017/, val2017/)")
    files = _coco_annotation_files(Path(annotations).expanduser())
    splits = karpathy_splits(Path(karpathy).expanduser()) if karpathy else None
    records: list[Record] = []
    seen: set[int] = set()
    not_in_split = duplicates = no_captions = blank = 0
    for ann_file in files:
        coco = _load_coco(ann_file)
        img_dir = _image_dir(root, ann_file)
        file_records: list[Record] = []
        for img in coco.loadImgs(sorted(coco.getImgIds())):
            image_id = int(img["id"])
            if image_id in seen:
                duplicates += 1
                continue
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a.get("id", 0))
            captions = [a["caption"].strip() for a in anns if has_words(a["caption"])]
            blank += len(anns) - len(captions)
            if not captions:
                no_captions += 1
                continue
            split = None
            if splits is not None:
                split = splits.get(image_id)
                if split is None:
                    not_in_split += 1
                    continue
            seen.add(image_id)
            file_name = str(img.get("file_name") or f"{image_id:012d}.jpg")
            file_records.append(Record(split=split or "", image_id=image_id, file_name=file_name,
                                       captions=captions, source=image_source(root, file_name, img_dir)))
        _require_some_exist(file_records, ann_file, img_dir,
                            f", or pass --annotations {ann_file.parent / '<one captions file>'} to use "
                            "only the images you have" if len(files) > 1 else "")
        records.extend(file_records)
    if splits is not None and not records:
        raise UserError(f"no image of {', '.join(str(f) for f in files)} is listed in {karpathy}; "
                        "is it dataset_coco.json?")
    if splits is None:
        assign_default_splits(records, {pos: str(r.image_id) for pos, r in enumerate(records)})
    if info is not None:
        info.update({
            "images_root": str(root),
            "annotations": [str(f) for f in files],
            "split_rule": f"karpathy ({karpathy}; restval -> train)" if karpathy else SPLIT_RULE,
            "left_out": {"not_in_split_file": not_in_split, "duplicate_ids": duplicates,
                         "without_captions": no_captions, "blank_captions": blank},
        })
    return records


# ----------------------------------------------------------------------------------------- Karpathy

def karpathy_records(json_path: str | Path, images: str | Path, info: dict | None = None) -> list[Record]:
    """Records from a Karpathy split file: ``images[].filepath`` (COCO only) / ``filename``,
    ``split`` (restval -> train), ``sentences[].raw``; id = ``cocoid`` if present, else ``imgid``."""
    path = Path(json_path).expanduser()
    root = Path(images).expanduser()
    data = _load_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path} is not a Karpathy split file (it needs an 'images' list, as in "
                        "dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json)")
    if not root.is_dir():
        raise UserError(f"images root {root} does not exist; point --images at the folder with the photos")
    dir_ok: dict[str, bool] = {}
    records: list[Record] = []
    unsplit: dict[int, str] = {}
    ids: set[int] = set()
    no_captions = blank = 0
    for n, img in enumerate(data["images"]):
        where = f"{path}, images[{n}]"
        if not isinstance(img, dict) or not img.get("filename"):
            raise UserError(f"{where}: no 'filename'; is this a Karpathy dataset_*.json file?")
        for key in ("filename", "filepath"):
            if img.get(key) is not None and not isinstance(img[key], str):
                raise UserError(f"{where}: '{key}' must be a string, got {img[key]!r}")
        image_id = img.get("cocoid", img.get("imgid", n))
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            raise UserError(f"{where}: image id {image_id!r} is not an integer") from None
        if image_id in ids:
            raise UserError(f"{where}: image id {image_id} appears twice; each image is listed once with its "
                            "own 'imgid' (or 'cocoid'): fix the file")
        ids.add(image_id)
        captions = []
        sentences = img.get("sentences")
        if sentences is not None and not isinstance(sentences, list):
            raise UserError(f"{where}: 'sentences' must be a list of {{\"raw\": ...}} objects, got a "
                            f"{type(sentences).__name__}; is this a Karpathy dataset_*.json file?")
        for j, s in enumerate(sentences or []):
            if not isinstance(s, dict):
                raise UserError(f"{where}, sentences[{j}]: expected an object with 'raw', got a {type(s).__name__}")
            raw = s.get("raw")
            if raw is None and s.get("tokens"):
                if not isinstance(s["tokens"], list) or not all(isinstance(t, str) for t in s["tokens"]):
                    raise UserError(f"{where}, sentences[{j}]: 'tokens' must be a list of strings")
                raw = " ".join(s["tokens"])
            if raw is not None and not isinstance(raw, str):
                raise UserError(f"{where}, sentences[{j}]: 'raw' must be a string, got {raw!r}")
            if raw and has_words(raw):
                captions.append(raw.strip())
            else:
                blank += 1
        if not captions:
            no_captions += 1
            continue
        sub = img.get("filepath") or ""
        if sub and sub not in dir_ok:
            dir_ok[sub] = (root / sub).is_dir()
        folder = root / sub if sub and dir_ok[sub] else root
        file_name = img["filename"]
        split = normalise_split(img.get("split"), where)
        if split is None:
            unsplit[len(records)] = file_name
        records.append(Record(split=split or "", image_id=image_id,
                              file_name=f"{sub}/{file_name}" if sub else file_name,
                              captions=captions, source=image_source(root, file_name, folder)))
    if not records:
        raise UserError(f"{path} lists no image with a caption (sentences[].raw with words); is this a "
                        "Karpathy dataset_*.json file?")
    _require_some_exist(records, path, root)
    if unsplit:
        assign_default_splits(records, unsplit)
    if info is not None:
        info.update({
            "images_root": str(root), "karpathy": str(path), "dataset": data.get("dataset"),
            "split_rule": "karpathy (restval -> train)" + (f"; {len(unsplit)} without a split: {SPLIT_RULE}"
                                                          if unsplit else ""),
            "left_out": {"without_captions": no_captions, "blank_captions": blank},
        })
    return records


# ------------------------------------------------------------------------------------------- folder

def _pick(columns: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    lower = {c.strip().lower(): c for c in columns if c is not None}
    for w in wanted:
        if w in lower:
            return lower[w]
    return None


def _rows_csv(path: Path, delimiter: str):
    """(line number, image, caption(s), split) from a CSV/TSV file with a header row."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
        except csv.Error as exc:
            raise UserError(f"{path}, line 1: not a valid CSV header ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc
        icol, ccol, scol = _pick(header, IMAGE_COLUMNS), _pick(header, CAPTION_COLUMNS), _pick(header, ("split",))
        if icol is None or ccol is None:
            raise UserError(f"{path}: the header ({', '.join(map(str, header)) or 'empty'}) needs an 'image' "
                            "and a 'caption' column (and optionally 'split'), e.g. 'image,caption,split'")
        try:
            for row in reader:
                line = reader.line_num
                if None in row:  # more cells than header columns
                    raise UserError(f"{path}, line {line}: more cells than the header has columns "
                                    "(quote captions that contain the delimiter)")
                yield line, row.get(icol), row.get(ccol), row.get(scol) if scol else None
        except csv.Error as exc:
            raise UserError(f"{path}, line {reader.line_num}: bad CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc


def _rows_jsonl(path: Path):
    try:
        fh = open(path, encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    with fh:
        try:
            for line, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}, line {line}: not valid JSON ({exc.msg})") from exc
                yield line, *_row_from_obj(obj, f"{path}, line {line}")
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc


def _rows_json(path: Path):
    data = _load_json(path, "captions file")
    if isinstance(data, dict):  # {"images": [...]} or {"annotations": [...]}
        data = data.get("images") or data.get("annotations") or data.get("rows")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects with 'image' and 'caption'")
    for n, obj in enumerate(data):
        yield n + 1, *_row_from_obj(obj, f"{path}, item {n}")


def _row_from_obj(obj: Any, where: str):
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object with 'image' and 'caption' keys")
    icol, ccol = _pick(obj, IMAGE_COLUMNS), _pick(obj, CAPTION_COLUMNS + ("captions",))
    if icol is None or ccol is None:
        raise UserError(f"{where}: needs 'image' and 'caption' keys (has {', '.join(obj) or 'none'})")
    scol = _pick(obj, ("split",))
    return obj[icol], obj[ccol], obj.get(scol) if scol else None


def folder_records(images: str | Path, captions: str | Path, info: dict | None = None) -> list[Record]:
    """Records from a captions file with one row per (image, caption): ``.csv`` / ``.tsv`` with a
    header (``image,caption[,split]``), ``.jsonl`` (one object per line) or ``.json`` (a list).
    Image paths are relative to ``images`` (absolute ones are used as they are when they lie inside
    it; paths that lead out of it are skipped, see the module doc). Image ids number
    the images in order of first appearance (0, 1, ...); rows of one image keep their order."""
    root = Path(images).expanduser()
    path = Path(captions).expanduser()
    if not path.is_file():
        raise UserError(f"captions file {path} does not exist")
    if not root.is_dir():
        raise UserError(f"images dir {root} does not exist; point --images at the folder the captions "
                        "file's image paths are relative to")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        rows = _rows_csv(path, ",")
    elif suffix == ".tsv":
        rows = _rows_csv(path, "\t")
    elif suffix == ".jsonl":
        rows = _rows_jsonl(path)
    elif suffix == ".json":
        rows = _rows_json(path)
    else:
        raise UserError(f"captions file {path}: use .csv (image,caption[,split]), .tsv or .jsonl")
    by_image: dict[str, Record] = {}
    split_line: dict[str, int] = {}
    blank = 0
    for line, image, caption, split in rows:
        where = f"{path}, line {line}"
        image = str(image).strip() if image is not None else ""
        caps = caption if isinstance(caption, list) else [caption]
        caps = [str(c).strip() for c in caps if c is not None and has_words(str(c))]
        if not image:
            if not caps:
                continue  # an empty row
            raise UserError(f"{where}: no image for caption {caps[0][:40]!r}")
        image = image.replace("\\", "/")
        split = normalise_split(split, where)
        rec = by_image.get(image)
        if rec is None:
            rec = by_image[image] = Record(split=split or "", image_id=len(by_image), file_name=image,
                                           captions=[], source=image_source(root, image))
            if split:
                split_line[image] = line
        elif split and rec.split and split != rec.split:
            raise UserError(f"{where}: {image} is in split {split!r} here but {rec.split!r} on line "
                            f"{split_line[image]}")
        elif split and not rec.split:
            rec.split = split
            split_line[image] = line
        if not caps:
            blank += 1
        rec.captions.extend(caps)
    records = [r for r in by_image.values() if r.captions]
    if not records:
        raise UserError(f"{path} has no rows with an image and a caption")
    _require_some_exist(records, path, root)
    for pos, r in enumerate(records):
        r.image_id = pos
    unsplit = {pos: r.file_name for pos, r in enumerate(records) if not r.split}
    if unsplit:
        assign_default_splits(records, unsplit)
    if info is not None:
        info.update({
            "images_root": str(root), "captions_file": str(path),
            "split_rule": ("split column" + (f"; {len(unsplit)} rows without one: {SPLIT_RULE}" if unsplit else "")
                           if len(unsplit) < len(records) else SPLIT_RULE),
            "left_out": {"blank_captions": blank, "images_without_captions": len(by_image) - len(records)},
        })
    return records
