"""Converters from public grounding annotations to xclip's phrase-annotation JSON lines.

Both produce records ``{"image", "caption", "phrases": [{"text", "start", "end", "boxes", "class"}]}`` with
boxes as ``[x0, y0, x1, y1]`` in original-image pixels, and a ``metadata.jsonl`` (``file_name``, ``text``) that
an ``imagefolder`` run config can read, so `xclip attribute` and `xclip evaluate` see the same pairs.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from xclip.errors import ConfigError
from xclip.disk.textfiles import read_text

ENTITY = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)+)\s+([^\]]+)\]")


def parse_flickr30k_sentence(line: str) -> tuple[str, list[dict[str, Any]]]:
    """Plain caption and its phrases ``(text, start, end, phrase_id, types)`` from one annotated sentence."""
    caption, phrases, cursor = "", [], 0
    for match in ENTITY.finditer(line):
        caption += line[cursor : match.start()]
        words = match.group(3).strip()
        phrases.append({
            "text": words,
            "start": len(caption),
            "end": len(caption) + len(words),
            "phrase_id": match.group(1),
            "types": match.group(2).strip("/").split("/"),
        })
        caption += words
        cursor = match.end()
    return caption + line[cursor:], phrases


def parse_flickr30k_boxes(xml_text: str) -> dict[str, list[list[int]]]:
    """Boxes per phrase id from one Annotations/<id>.xml (0-based pixels, as the official loader gives)."""
    boxes: dict[str, list[list[int]]] = {}
    for obj in ET.fromstring(xml_text).iter("object"):
        box = obj.find("bndbox")
        if box is None:  # nobndbox / scene objects carry no box
            continue
        coords = [int(box.findtext(k, "0")) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
        for name in obj.findall("name"):
            boxes.setdefault(name.text or "", []).append(coords)
    return boxes


def convert_flickr30k_entities(root: str | Path, out: str | Path, *, split: str | None = None) -> Path:
    """``root`` holds Sentences/ and Annotations/ (and optionally <split>.txt listing image ids)."""
    root, out = Path(root), Path(out)
    if not (root / "Sentences").is_dir() or not (root / "Annotations").is_dir():
        msg = f"{root} must contain the Flickr30k Entities folders Sentences/ and Annotations/"
        raise ConfigError(msg)
    if split:
        ids = read_text(root / f"{split}.txt", f"the {split!r} split file").split()
    else:
        ids = sorted(p.stem for p in (root / "Sentences").glob("*.txt"))
    if not ids:
        where = f"the split file {root / f'{split}.txt'} lists no image ids" if split else f"{root / 'Sentences'} holds no .txt files"
        msg = f"nothing to convert: {where}"
        raise ConfigError(msg)
    records = []
    for image_id in ids:
        annotation = root / "Annotations" / f"{image_id}.xml"
        try:
            boxes = parse_flickr30k_boxes(read_text(annotation, "annotation")) if annotation.is_file() else {}
        except (ET.ParseError, ValueError) as e:
            msg = f"{annotation}: not a Flickr30k Entities annotation ({e})"
            raise ConfigError(msg) from None
        for line in read_text(root / "Sentences" / f"{image_id}.txt", f"the sentences of image {image_id}").splitlines():
            if not line.strip():
                continue
            caption, phrases = parse_flickr30k_sentence(line.strip())
            grounded = [
                {"text": p["text"], "start": p["start"], "end": p["end"], "boxes": boxes[p["phrase_id"]],
                 "class": p["types"][0]}
                for p in phrases
                if p["phrase_id"] != "0" and boxes.get(p["phrase_id"])  # 0 = not visual
            ]
            records.append({"image": f"{image_id}.jpg", "caption": caption, "phrases": grounded})
    return _write(records, out, f"{root / 'Annotations'} (no sentence phrase has a box there)")


def convert_coco_instances(instances: str | Path, captions: str | Path, out: str | Path) -> Path:
    """Phrases are category names (or their plural with -s) found in each caption; boxes are every instance of
    that category in the image."""
    instance_data = _read_json(Path(instances), "COCO instances file")
    caption_data = _read_json(Path(captions), "COCO captions file")
    try:
        files = {image["id"]: image["file_name"] for image in instance_data["images"]}
        names = {c["id"]: c["name"] for c in instance_data["categories"]}
        boxes: dict[tuple[int, str], list[list[float]]] = {}
        for a in instance_data["annotations"]:
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes.setdefault((a["image_id"], names[a["category_id"]]), []).append([x, y, x + w, y + h])
    except (KeyError, TypeError, ValueError) as e:
        msg = f"{instances}: not a COCO instances file (images[].id/file_name, categories[].id/name, annotations[].image_id/category_id/bbox): {e!r}"
        raise ConfigError(msg) from None
    try:
        caption_annotations = sorted(caption_data["annotations"], key=lambda a: (a["image_id"], a["id"]))
        if not all(isinstance(a["caption"], str) for a in caption_annotations):
            raise TypeError("a caption is not a string")
    except (KeyError, TypeError) as e:
        msg = f"{captions}: not a COCO captions file (annotations[].id/image_id/caption): {e!r}"
        raise ConfigError(msg) from None
    records = []
    for a in caption_annotations:
        caption = a["caption"].strip()
        phrases = []
        for name in sorted(set(names.values())):
            found = boxes.get((a["image_id"], name))
            match = re.search(rf"\b{re.escape(name)}s?\b", caption, flags=re.I) if found else None
            if match:
                phrases.append({"text": match.group(0), "start": match.start(), "end": match.end(), "boxes": found,
                                "class": name})
        if a["image_id"] in files:
            records.append({"image": files[a["image_id"]], "caption": caption, "phrases": phrases})
    return _write(records, out, f"{instances} and {captions} (no caption names a category with a box in its image)")


def _read_json(path: Path, what: str) -> Any:
    try:
        data = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        msg = f"{path}:{e.lineno}: the {what} is not valid JSON: {e.msg}"
        raise ConfigError(msg) from None
    if not isinstance(data, dict):
        msg = f"{path}: the {what} must be a JSON object"
        raise ConfigError(msg)
    return data


def _write(records: list[dict[str, Any]], out: Path, source: str) -> Path:
    """The captions with grounded phrases as annotations.jsonl and metadata.jsonl in ``out``; none is an error
    naming ``source`` (empty files would only fail later, in evaluate)."""
    with_phrases = [r for r in records if r["phrases"]]
    if not with_phrases:
        msg = f"nothing to convert: {len(records)} caption(s) read, none with a grounded phrase, from {source}"
        raise ConfigError(msg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_phrases))
    (out / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": r["image"], "text": r["caption"]}) + "\n" for r in with_phrases)
    )
    return out / "annotations.jsonl"
