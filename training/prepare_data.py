"""Prepare emoji image/caption pairs for training the embedded model.

Sources (see /work/shared/embedded-model-notes.md for the licence study):
  * Noto emoji   -- npm `emoji-datasource-google@16.0.0`  (images Apache-2.0)
  * Twemoji      -- npm `emoji-datasource-twitter@16.0.0` (images CC-BY 4.0, attribution required)
Apple/Facebook (not freely licensed) and OpenMoji (share-alike) are deliberately not used.

The npm tarballs are read directly (no unpacking). Each 64x64 RGBA PNG is composited on white
and written as RGB; captions come from `emoji.json` (`name` + `short_names`). Output layout:

    OUT/images/<style>/<image>.png
    OUT/metadata.jsonl   one line per image: {"file", "emoji", "style", "category", "captions"}

Everything is sorted, so the same input always gives byte-identical output.

    python training/prepare_data.py --fetch --raw /work/emoji-data/npm --out /work/emoji-data/prepared
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
from pathlib import Path

from PIL import Image

PACKAGES = {  # style -> npm package spec; pinned so the data set is reproducible
    "google": "emoji-datasource-google@16.0.0",
    "twitter": "emoji-datasource-twitter@16.0.0",
}
SIZE = 64  # native resolution of the embedded model
# Categories left out by default: fewer concepts train better on little compute (see the notes),
# flags are mostly unreadable at 64 px, and "Component" holds bare skin-tone swatches / hair parts.
DEFAULT_SKIP_CATEGORIES = ("Flags", "Component")


def tarball_path(raw: Path, style: str) -> Path:
    name, version = PACKAGES[style].rsplit("@", 1)
    return raw / f"{name}-{version}.tgz"


def fetch(raw: Path, styles: list[str]) -> None:
    """Download the pinned npm tarballs with `npm pack` (only those that are missing)."""
    raw.mkdir(parents=True, exist_ok=True)
    for style in styles:
        if not tarball_path(raw, style).exists():
            subprocess.run(["npm", "pack", PACKAGES[style]], cwd=raw, check=True)


def clean_name(text: str) -> str:
    """'SMILING FACE WITH OPEN MOUTH' / 'smiley_cat' -> 'smiling face with open mouth' / 'smiley cat'."""
    text = text.lower().replace("_", " ").replace("-", " ")
    return " ".join(text.split())


def captions_for(entry: dict, tone_name: str | None = None) -> list[str]:
    """Several caption variants per image: the full name, each short name, and a templated form."""
    names = []
    for raw_name in [entry.get("name") or ""] + list(entry.get("short_names") or []):
        name = clean_name(raw_name)
        if name and name not in names:
            names.append(name)
    if not names:
        return []
    if tone_name:
        names = [f"{n}, {tone_name}" for n in names]
    variants = names + [f"{names[0]} emoji"]
    return list(dict.fromkeys(variants))  # unique, order kept


# Skin-tone modifier code points -> words used in captions (only with --skin-tones).
TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium dark skin tone",
    "1F3FF": "dark skin tone",
}


def list_items(entries: list[dict], style: str, skip_categories, skin_tones: bool) -> list[dict]:
    """Which images to take from one style: (image file, emoji id, captions)."""
    items = []
    for entry in entries:
        if entry.get("category") in skip_categories or not entry.get(f"has_img_{style}"):
            continue
        caps = captions_for(entry)
        if not caps:
            continue
        items.append({"image": entry["image"], "emoji": entry["unified"], "category": entry.get("category"), "captions": caps})
        if skin_tones:
            for key, var in sorted((entry.get("skin_variations") or {}).items()):
                if not var.get(f"has_img_{style}") or "-" in key:  # skip two-person mixed tones
                    continue
                items.append({
                    "image": var["image"],
                    "emoji": entry["unified"],  # same concept: any skin tone counts as a hit
                    "category": entry.get("category"),
                    "captions": captions_for(entry, TONES.get(key)),
                })
    return items


def on_white(png_bytes: bytes, size: int = SIZE) -> Image.Image:
    """Composite an RGBA emoji on a white background (transparent pixels become white)."""
    img = Image.open(io.BytesIO(png_bytes)).convert("RGBA")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


def prepare(raw: Path, out: Path, styles: list[str], skip_categories=DEFAULT_SKIP_CATEGORIES,
            skin_tones: bool = False, limit: int | None = None) -> list[dict]:
    """Read the tarballs in `raw`, write images and metadata.jsonl to `out`; return the records."""
    records = []
    for style in styles:
        with tarfile.open(tarball_path(raw, style), "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            entries = json.load(tar.extractfile(members["package/emoji.json"]))
            entries.sort(key=lambda e: e.get("sort_order", 0))
            items = list_items(entries, style, skip_categories, skin_tones)
            if limit:
                items = items[:limit]
            (out / "images" / style).mkdir(parents=True, exist_ok=True)
            for item in items:
                member = members.get(f"package/img/{style}/64/{item['image']}")
                if member is None:
                    continue  # listed in emoji.json but no picture shipped
                rel = f"images/{style}/{item['image']}"
                on_white(tar.extractfile(member).read()).save(out / rel, optimize=False)
                records.append({"file": rel, "emoji": item["emoji"], "style": style,
                                "category": item["category"], "captions": item["captions"]})
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=Path("/work/emoji-data/npm"), help="folder with the npm tarballs")
    ap.add_argument("--out", type=Path, default=Path("/work/emoji-data/prepared"))
    ap.add_argument("--styles", nargs="+", default=list(PACKAGES), choices=list(PACKAGES))
    ap.add_argument("--fetch", action="store_true", help="run `npm pack` for missing tarballs")
    ap.add_argument("--skin-tones", action="store_true", help="also take the single-tone skin variants")
    ap.add_argument("--flags", action="store_true", help="keep the Flags category")
    ap.add_argument("--limit", type=int, help="at most this many emoji per style (quick runs)")
    args = ap.parse_args()
    if args.fetch:
        fetch(args.raw, args.styles)
    skip = tuple(c for c in DEFAULT_SKIP_CATEGORIES if not (args.flags and c == "Flags"))
    records = prepare(args.raw, args.out, args.styles, skip, args.skin_tones, args.limit)
    n_caps = sum(len(r["captions"]) for r in records)
    print(f"wrote {len(records)} images, {n_caps} captions, {len({r['emoji'] for r in records})} emoji -> {args.out}")


if __name__ == "__main__":
    main()
