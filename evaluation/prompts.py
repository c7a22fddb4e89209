"""Prompt files: TSV (PartiPrompts), CSV (COCO-30k), a COCO captions .json, JSONL, or plain text, as a list
of dicts with "prompt".

    prompts = read_prompts("../shared/data/PartiPrompts.tsv")   # [{"prompt", "Category", "Challenge", "Note"}, ...]

TSV is read with csv.QUOTE_NONE: PartiPrompts has prompts that start with a double quote, which default
CSV quoting would strip. The prompt column is the first of Prompt / prompt / caption / text. A COCO captions
file (captions_val2014.json / captions_val2017.json) gives one prompt per image: its first caption. A file
must be UTF-8 (a leading byte-order mark is dropped): one that is not, a JSON file that does not parse, a
JSONL line that is not an object, a TSV/CSV row of more fields than its header, or a prompt that is missing, not
text or blank, is a ValueError naming the file and line (or the COCO entry).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

PROMPT_COLUMNS = ("Prompt", "prompt", "caption", "text")


def _with_prompt(row: dict, source: str, line: int) -> dict:
    key = next((k for k in PROMPT_COLUMNS if k in row), None)
    if key is None:
        raise ValueError(f"{source}:{line}: no prompt (expected a column or field named {', '.join(PROMPT_COLUMNS)})")
    return {**row, "prompt": _prompt_text(row[key], f"{source}:{line}: {key}")}


def _prompt_text(value, where: str) -> str:
    """A prompt's text, stripped; ValueError naming `where` for a value that is not text or is blank (which would
    become the text 'None', or the empty caption: the unconditional one guidance is measured against)."""
    if value is None:  # (a CSV row with fewer fields than the header; JSON null)
        raise ValueError(f"{where} is missing (null, or a row with fewer fields than the header)")
    if not isinstance(value, str):
        raise ValueError(f"{where} is {json.dumps(value)}, not text")
    if not value.strip():
        raise ValueError(f"{where} is blank: a prompt needs text (a blank caption is the unconditional one)")
    return value.strip()


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:  # utf-8-sig: without the byte-order mark some editors write, which would stick to the first column's name
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); expected a "
                         "UTF-8 prompt file (convert it, e.g. iconv -f latin1 -t utf-8)") from None


def _all_fields(row: dict, rows: csv.DictReader, path: Path, suffix: str) -> dict:
    """The row; ValueError naming the line for a row of more fields than the header, which DictReader keeps apart
    (under the key None): a caption's unquoted comma, a tab in a TSV prompt, cut the prompt there and shifted the
    rest into the next columns (a Category of 'on a mat') without a word."""
    if None in row:
        fields = len(rows.fieldnames) + len(row[None])
        hint = ("quote a caption that holds a comma" if suffix == ".csv"
                else "a prompt of a .tsv cannot hold a tab (TSV is read unquoted)")
        raise ValueError(f"{path}:{rows.line_num}: {fields} fields, the header has {len(rows.fieldnames)} "
                         f"({', '.join(rows.fieldnames)}); {hint}")
    return row


def _json(text: str, source: str, line: int = 0):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{line or e.lineno}: not valid JSON ({e.msg})") from None


def _json_object(text: str, source: str, line: int) -> dict:
    row = _json(text, source, line)
    if not isinstance(row, dict):
        kind = {str: "string", list: "array", bool: "boolean", type(None): "null"}.get(type(row), "number")
        raise ValueError(f"{source}:{line}: a JSON {kind}, not an object; expected one object per line with a field "
                         f"named {', '.join(PROMPT_COLUMNS)}")
    return row


def read_prompts(path: str | Path, limit: int = 0) -> list[dict]:
    """The first `limit` prompts of a file (0: all); ValueError naming it for a file of no prompt (a run over none
    would write an empty result and exit 0)."""
    prompts = _read_prompts(Path(path))
    if not prompts:
        raise ValueError(f"prompt file {path}: no prompts; expected a prompt file with at least one prompt")
    return prompts[: limit or None]


def _read_prompts(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    text = _text(path)
    if suffix in (".tsv", ".csv"):
        opts = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        rows = csv.DictReader(io.StringIO(text, newline=""), **opts)
        return [_with_prompt(_all_fields(row, rows, path, suffix), str(path), rows.line_num) for row in rows]  # (the
        # row's last line: blank lines and quoted line breaks counted)
    if suffix == ".json":
        return coco_captions(_json(text, str(path)), str(path))
    lines = io.StringIO(text, newline="")
    if suffix == ".jsonl":
        return [_with_prompt(_json_object(line, str(path), i + 1), str(path), i + 1)
                for i, line in enumerate(lines) if line.strip()]
    return [{"prompt": line.strip()} for line in lines if line.strip()]


def coco_captions(data: dict, source: str) -> list[dict]:
    """The first caption of each image of a COCO captions file, in the order of its "images" list."""
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{source}: expected a COCO captions file with \"images\" and \"annotations\"")
    first: dict[int, str] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{source}: annotations[{i}] has no \"image_id\" (expected COCO caption annotations)")
        if ann["image_id"] not in first:  # (only the caption used is checked: a later blank one is never a prompt)
            first[ann["image_id"]] = _prompt_text(ann.get("caption"), f"{source}: annotations[{i}].caption")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise ValueError(f"{source}: images[{i}] has no \"id\" (expected COCO image entries)")
    return [{"prompt": first[im["id"]], "image_id": im["id"], "file_name": im.get("file_name", "")}
            for im in data["images"] if im["id"] in first]
