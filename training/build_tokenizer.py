"""Rebuild the CLIP BPE tokenizer (the one SD 1.x and 2.x use) offline.

The BPE merge list ships inside the MIT-licensed `clip-anytorch` wheel; we turn it into the
vocab.json + merges.txt pair that transformers' CLIPTokenizer loads. The output is committed,
so this script only needs to run again if the files are lost.

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/clip
    python training/build_tokenizer.py /tmp/clip/clip_anytorch-2.6.0-py3-none-any.whl
"""
from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "webui" / "engine" / "model_configs" / "clip-tokenizer"
BPE_MEMBER = "clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 48,894 merges of the file (49,152 - 256 - 2).
MERGE_COUNT = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map GPT-2 and CLIP use for byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def read_merges(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8")
    lines = text.split("\n")
    return lines[1 : MERGE_COUNT + 1]  # the first line is a version header


def build_vocab(merges: list[str]) -> dict[str, int]:
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(wheel: Path, out: Path) -> None:
    merges = read_merges(wheel)
    vocab = build_vocab(merges)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="path to clip_anytorch-2.6.0-py3-none-any.whl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    write_tokenizer(args.wheel, args.out)


if __name__ == "__main__":
    main()
