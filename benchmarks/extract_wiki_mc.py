"""Build the shipped `wiki_description` zero-shot task from the Wikipedia-lead evaluation split.

Each example asks for the short description of an article title; the three distractors are descriptions
of other evaluation-split articles. Only evaluation-split titles are used, so calibration never sees them.

    python benchmarks/extract_wiki_mc.py --n 200 --seed 0 --out datamodules/data/zeroshot/wiki_description.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from datamodules.assets import _WIKI_PACKAGE, _package_file, split_of


def build(n: int, seed: int, num_choices: int = 4) -> list[dict]:
    path, _ = _package_file(_WIKI_PACKAGE)
    entries = json.loads(path.read_text(encoding="utf-8"))
    pool = sorted(
        (title, entry["description"].strip())
        for title, entry in entries.items()
        if split_of(title) == "evaluation" and (entry.get("description") or "").strip()
    )
    # Descriptions must be distinct, or a distractor could be a correct answer too.
    by_description: dict[str, str] = {}
    for title, description in pool:
        by_description.setdefault(description.lower(), title)
    pool = [(t, d) for t, d in pool if by_description[d.lower()] == t]
    rng = random.Random(seed)
    picked = rng.sample(pool, n)
    records = []
    for title, description in picked:
        others = [d for t, d in pool if t != title]
        choices = rng.sample(others, num_choices - 1) + [description]
        rng.shuffle(choices)
        context = f"Wikipedia article: {title}\nShort description:"
        records.append({"context": context, "choices": choices, "label": choices.index(description)})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = build(args.n, args.seed)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    main()
