"""Benchmark files built from the synthetic test scenes, in the released benchmarks' formats.

``benchmarks/sugarcrepe/`` holds two SugarCrepe-format categories ({id: {filename, caption, negative_caption}}):
``swap_att.json`` (the colors of two objects swapped) and ``swap_obj.json`` (two objects swapped between their
positions), for every test scene with two objects that differ in what is swapped. ``benchmarks/zeroshot_color/``
and ``benchmarks/zeroshot_shape/`` are ImageFolder directories of the single-object test scenes with their own
``classnames.txt`` and ``zeroshot_classification_templates.txt`` (CLIP_benchmark's names, ``{c}`` for the
class), prompts in the captions' phrasing. Captions use only the synthetic vocabulary, so a checkpoint with the
synthetic tokenizer reads every word. Image paths in the SugarCrepe files are relative to the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

from vlp.data.synthetic import COLORS, SHAPES, ZEROSHOT_TEMPLATES, SceneObject, SyntheticScenes

__all__ = ["describe", "swapped_colors", "swapped_positions", "write_synthetic_benchmarks"]


def describe(objects: list[SceneObject]) -> str:
    """The scene's description in the captions' first phrasing: "a small red circle at the top and ..."."""
    parts = [f"{o.noun} {o.position_phrase}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _swap_two(objects: list[SceneObject], rng: random.Random, differ: Callable[[SceneObject, SceneObject], bool],
              exchange: Callable[[SceneObject, SceneObject], SceneObject]) -> list[SceneObject] | None:
    """Two objects a, b drawn among the pairs that ``differ``, replaced by ``exchange(a, b)`` and
    ``exchange(b, a)``; None when no pair differs."""
    pairs = [(a, b) for a in range(len(objects)) for b in range(a + 1, len(objects)) if differ(objects[a], objects[b])]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    swapped = list(objects)
    swapped[a], swapped[b] = exchange(objects[a], objects[b]), exchange(objects[b], objects[a])
    return swapped


def swapped_colors(objects: list[SceneObject], rng: random.Random) -> list[SceneObject] | None:
    """The objects with the colors of two of them exchanged, or None when no two differ in color."""
    return _swap_two(objects, rng, lambda x, y: x.color != y.color,
                     lambda x, y: dataclasses.replace(x, color=y.color))


def swapped_positions(objects: list[SceneObject], rng: random.Random) -> list[SceneObject] | None:
    """The objects with two of them exchanged between their positions (the description keeps its order of
    positions), or None when no two objects differ."""
    return _swap_two(objects, rng, lambda x, y: x.noun != y.noun,
                     lambda x, y: dataclasses.replace(y, position=x.position, box=x.box))


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def write_synthetic_benchmarks(out_dir: str | Path, test_size: int = 1000, seed: int = 0,
                               image_size: int = 64) -> dict[str, Path]:
    """Write the synthetic benchmark files under ``out_dir/benchmarks`` (images rendered under
    ``out_dir/benchmarks/images``); returns the paths by name."""
    root = Path(out_dir)
    base = root / "benchmarks"
    scenes = SyntheticScenes(test_size, seed, "test", image_size)
    rng = random.Random(f"vlp-synthetic-benchmarks:{seed}")
    (base / "images").mkdir(parents=True, exist_ok=True)
    sugarcrepe: dict[str, dict[str, dict[str, str]]] = {"swap_att": {}, "swap_obj": {}}
    folders = {"color": base / "zeroshot_color", "shape": base / "zeroshot_shape"}
    for index in range(len(scenes)):
        objects = list(scenes.objects(index))
        image = f"benchmarks/images/{index:06d}.png"
        if len(objects) == 1:
            picture = scenes.render(index)
            for attribute, folder in folders.items():
                label = getattr(objects[0], attribute)
                (folder / label).mkdir(parents=True, exist_ok=True)
                picture.save(folder / label / f"{index:06d}.png")
            continue
        wrote = False
        for category, swap in (("swap_att", swapped_colors), ("swap_obj", swapped_positions)):
            negative = swap(objects, rng)
            if negative is None:
                continue
            sugarcrepe[category][str(len(sugarcrepe[category]))] = {
                "filename": image, "caption": describe(objects), "negative_caption": describe(negative)}
            wrote = True
        if wrote:
            scenes.render(index).save(root / image)
    (base / "sugarcrepe").mkdir(parents=True, exist_ok=True)
    paths = {"benchmark_root": root}
    for category, records in sugarcrepe.items():
        paths[f"sugarcrepe_{category}"] = base / "sugarcrepe" / f"{category}.json"
        _write_json(paths[f"sugarcrepe_{category}"], records)
    for attribute, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        # ImageFolder numbers the classes in sorted folder order; classnames.txt follows that order
        names = sorted(c for c in (COLORS if attribute == "color" else SHAPES) if (folder / c).is_dir())
        (folder / "classnames.txt").write_text("\n".join(names) + "\n")
        (folder / "zeroshot_classification_templates.txt").write_text(
            "\n".join(t.replace("{}", "{c}") for t in ZEROSHOT_TEMPLATES[attribute]) + "\n")
        paths[f"zeroshot_{attribute}"] = folder
    return paths
