"""Write the vlm examples' question set: shapes renders as PNGs, and the YAML ``inputs`` lists.

    python benchmarks/vlm_example_data.py                       # PNGs, then print the lists
    python benchmarks/vlm_example_data.py --yaml examples/fastv.yaml   # also set them in a YAML

96 questions of the ``gate`` split (held out from the zoo model's training and
selection), seed 1 (the gate itself is measured on seed 0), 24 of each kind (shape,
colour, position, describe), as 32x32 PNGs under ``examples/data/shapes-vqa/``. A YAML's
``images``, ``prompt`` and ``answers`` lines under ``inputs:`` are replaced by one-line
lists; image paths are relative to the repository root, where the examples' commands run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("examples/data/shapes-vqa")
"""The PNGs' folder, relative to the repository root."""
COUNT, SEED, SPLIT = 96, 1, "gate"


def example_items() -> list:
    """The questions: `shapes_vqa.vqa_items` (96, seed 1, the gate split)."""
    from decodekit.pipelines.zoo.shapes_vqa import vqa_items

    return vqa_items(COUNT, seed=SEED, split=SPLIT)


def image_path(i: int) -> str:
    """Item ``i``'s PNG, relative to the repository root."""
    return str(DATA / f"{i:03d}.png")


def example_inputs() -> dict[str, list[str]]:
    """The YAML ``inputs`` lists: ``images`` (paths), ``prompt`` (questions), ``answers``."""
    items = example_items()
    return {
        "images": [image_path(i) for i in range(len(items))],
        "prompt": [it.question for it in items],
        "answers": [it.answer for it in items],
    }


def write_images(root: Path = ROOT) -> list[Path]:
    """Save every item's render as ``<root>/examples/data/shapes-vqa/NNN.png``."""
    (root / DATA).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(example_items()):
        path = root / image_path(i)
        item.image.save(path, optimize=True)
        paths.append(path)
    return paths


def set_yaml_inputs(path: Path, inputs: dict[str, list[str]]) -> None:
    """Replace the ``  images:``, ``  prompt:`` and ``  answers:`` lines of ``path`` (each one
    line under ``inputs:``) with ``inputs``'s lists; a missing ``answers`` line goes after
    ``prompt``."""
    lines = path.read_text().splitlines()
    found = set()
    for i, line in enumerate(lines):
        m = re.match(r"^  (images|prompt|answers):", line)
        if m:
            lines[i] = f"  {m.group(1)}: {json.dumps(inputs[m.group(1)])}"
            found.add(m.group(1))
    if {"images", "prompt"} - found:
        raise SystemExit(f"{path}: needs one-line 'images:' and 'prompt:' entries under inputs")
    if "answers" not in found:
        at = next(i for i, line in enumerate(lines) if line.startswith("  prompt:"))
        lines.insert(at + 1, f"  answers: {json.dumps(inputs['answers'])}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--yaml", type=Path, nargs="*", default=[], help="examples to set inputs in")
    args = ap.parse_args()
    paths = write_images()
    inputs = example_inputs()
    for path in args.yaml:
        set_yaml_inputs(path, inputs)
    print(f"wrote {len(paths)} PNGs under {DATA}")
    if not args.yaml:
        for key, values in inputs.items():
            print(f"  {key}: {json.dumps(values)}")


if __name__ == "__main__":
    main()
