"""First versus second load of the default dataset (the decode-once caches of docs/reference/data.md).

Runs in a fresh, temporary CLIPSE_CACHE. "first" is a cold load: reading the Flickr8k-layout
files, decoding and resizing every image, tokenising every caption (the synthetic dataset is
generated beforehand and timed separately); "second" is the same call with the caches warm.

    python benchmarks/data_cache.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def load_all(config, loaded):
    from clipse.training.assembly import dataset_for, split_tensors

    dataset = dataset_for(config)
    return [split_tensors(dataset, split, loaded) for split in ("train", "val", "test")]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="clipse-cache-bench-") as tmp:
        os.environ["CLIPSE_CACHE"] = tmp
        from clipse.config import TrainConfig
        from clipse.data.formats.shapes import ensure_shapes_dataset
        from clipse.data.synthetic import ShapesSpec
        from clipse.training.assembly import model_for

        config = TrainConfig()
        loaded = model_for(config)
        started = time.perf_counter()
        ensure_shapes_dataset(ShapesSpec(config.shapes_train_images, config.shapes_val_images,
                                         config.shapes_test_images, config.data_seed))
        generate = time.perf_counter() - started
        started = time.perf_counter()
        tensors = load_all(config, loaded)
        first = time.perf_counter() - started
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            load_all(config, loaded)
            seconds.append(time.perf_counter() - started)
        second = statistics.median(seconds)
    images = sum(len(t.images) for t in tensors)
    captions = sum(len(t.tokens) for t in tensors)
    print(f"default dataset: {images} images, {captions} captions at {loaded.image_size} px")
    print(f"generate synthetic files: {generate:.2f} s (once per dataset)")
    print(f"first load (decode + tokenise): {first:.3f} s")
    print(f"second load (cache hits, median of 5): {second:.3f} s")
    print(f"speed-up: {first / second:.1f}x")


if __name__ == "__main__":
    main()
