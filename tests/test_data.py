"""Readers for every supported format, the synthetic dataset, caches and batch samplers."""

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import (
    captions_for,
    write_flickr8k,
    write_jpeg,
    write_kaggle_captions,
    write_karpathy,
    write_openclip_csv,
)

from clipse.data import ShapesSpec, load_caption_dataset, load_split_tensors
from clipse.data.cache import cached_images, cached_tokens
from clipse.data.formats.shapes import ensure_shapes_dataset
from clipse.data.sampling import TopicalBatchSampler, auto_cluster_count, random_batches
from clipse.util.errors import UserError


def names_of(split):
    return [p.name for p in split.image_paths]


def assert_consistent(split):
    """Every caption points at a real row; captions of one image are contiguous and in order."""
    assert len(split.caption_image) == len(split.captions)
    assert split.caption_image.min() >= 0 and split.caption_image.max() < len(split.image_paths)
    assert np.all(np.diff(split.caption_image) >= 0)
    for k, row in enumerate(split.caption_image):
        assert split.image_paths[row].name in split.captions[k] or "caption" not in split.captions[k]


def test_flickr8k_original_with_real_quirks(tmp_path, caplog):
    splits = write_flickr8k(tmp_path, quirks=True, crlf=True)
    with caplog.at_level(logging.WARNING):
        ds = load_caption_dataset("flickr8k", tmp_path)
    for name in ("train", "val", "test"):
        split = ds.split(name)
        assert names_of(split) == splits[name]
        assert split.n_pairs == 5 * len(splits[name])
        assert_consistent(split)
    first = ds.split("train")
    assert first.captions[:2] == captions_for(splits["train"][0])[:2]  # no CR, no trailing spaces
    assert not any(c.endswith((" ", "\r")) for c in first.captions)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 5 caption lines" in warnings[0] and ".jpg.1" in warnings[0]


def test_flickr8k_token_file_path_and_lf(tmp_path):
    write_flickr8k(tmp_path, quirks=False, crlf=False)
    ds = load_caption_dataset("flickr8k", tmp_path / "Flickr8k_text" / "Flickr8k.token.txt")
    assert [len(ds.split(s).image_paths) for s in ("train", "val", "test")] == [6, 2, 2]


def test_flickr8k_missing_image_file_is_skipped_and_counted(tmp_path, caplog):
    splits = write_flickr8k(tmp_path, quirks=False)
    (tmp_path / "Flicker8k_Dataset" / splits["train"][1]).unlink()
    with caplog.at_level(logging.WARNING):
        ds = load_caption_dataset("flickr8k", tmp_path)
    assert len(ds.split("train").image_paths) == 5
    assert any("skipped 1 images whose file does not exist" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("problem,message", [
    ("missing_folder", "data folder not found"),
    ("malformed", "Flickr8k.token.txt:3: malformed line"),
    ("empty_split", "split 'val' has no usable image-caption pairs"),
    ("no_images", "no image folder holds its images"),
    ("missing_split_file", "Flickr_8k.devImages.txt: file not found"),
])
def test_flickr8k_errors_name_the_file(tmp_path, problem, message):
    root = tmp_path / "data"
    if problem != "missing_folder":
        write_flickr8k(root, quirks=False, crlf=False)
    text = root / "Flickr8k_text"
    if problem == "malformed":
        lines = (text / "Flickr8k.token.txt").read_text().splitlines()
        lines[2] = "img0000.jpg this line has no tab"
        (text / "Flickr8k.token.txt").write_text("\n".join(lines))
    if problem == "empty_split":
        (text / "Flickr_8k.devImages.txt").write_text("\n")
    if problem == "no_images":
        import shutil
        shutil.rmtree(root / "Flicker8k_Dataset")
    if problem == "missing_split_file":
        (text / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_caption_dataset("flickr8k", root)


@pytest.mark.parametrize("coco", [False, True])
def test_karpathy_json(tmp_path, coco):
    splits = write_karpathy(tmp_path, coco=coco)
    ds = load_caption_dataset("karpathy", tmp_path)  # the folder: finds the single dataset_*.json
    per_image = 6 if coco else 5
    assert names_of(ds.split("train")) == splits["train"] + splits["restval"]  # restval -> train
    assert names_of(ds.split("val")) == splits["val"]
    assert names_of(ds.split("test")) == splits["test"]
    for s in ("train", "val", "test"):
        assert ds.split(s).n_pairs == per_image * len(ds.split(s).image_paths)
        assert all(p.is_file() for p in ds.split(s).image_paths)
        assert_consistent(ds.split(s))


def test_karpathy_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "dataset_flickr8k.json").write_text('{"images": [\n{"filename": }\n]}')
    with pytest.raises(UserError, match=r"dataset_flickr8k.json:2: not valid JSON"):
        load_caption_dataset("karpathy", tmp_path)


def test_kaggle_captions_seeded_split(tmp_path, caplog):
    names = write_kaggle_captions(tmp_path, n_images=20)
    with caplog.at_level(logging.INFO):
        ds = load_caption_dataset("csv", tmp_path, split_seed=3)
    sizes = [len(ds.split(s).image_paths) for s in ("train", "val", "test")]
    assert sizes == [16, 2, 2]
    assert any("seeded split (seed 3)" in r.getMessage() and "train 16, val 2, test 2" in r.getMessage()
               for r in caplog.records)
    seen = [n for s in ("train", "val", "test") for n in names_of(ds.split(s))]
    assert sorted(seen) == sorted(names)  # each image in exactly one split, with all 5 captions
    assert all(ds.split(s).n_pairs == 5 * len(ds.split(s).image_paths) for s in ("train", "val", "test"))
    assert ds.split("train").captions[0].endswith(", with a comma")  # quoted comma kept
    again = load_caption_dataset("csv", tmp_path / "captions.txt", split_seed=3)
    assert names_of(again.split("test")) == names_of(ds.split("test"))
    other = load_caption_dataset("csv", tmp_path, split_seed=4)
    assert names_of(other.split("test")) != names_of(ds.split("test"))


def test_kaggle_captions_with_flickr_split_files(tmp_path):
    names = write_kaggle_captions(tmp_path, n_images=20, with_split_files=True)
    ds = load_caption_dataset("csv", tmp_path)
    assert names_of(ds.split("train")) == names[:14]
    assert names_of(ds.split("val")) == names[14:17]
    assert names_of(ds.split("test")) == names[17:]


@pytest.mark.parametrize("separator", ["\t", ","])
def test_openclip_csv_with_split_column(tmp_path, separator):
    splits = write_openclip_csv(tmp_path, separator)
    ds = load_caption_dataset("csv", tmp_path)
    for s in ("train", "val", "test"):
        assert names_of(ds.split(s)) == splits[s]
        assert ds.split(s).n_pairs == 2 * len(splits[s])


def test_csv_errors(tmp_path):
    (tmp_path / "captions.txt").write_text("picture,text\na.jpg,hello\n")
    with pytest.raises(UserError, match="expected columns 'image,caption' or 'filepath,title'"):
        load_caption_dataset("csv", tmp_path)
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,hello,world\n")
    with pytest.raises(UserError, match=r"captions.txt:2: 3 fields, expected 2"):
        load_caption_dataset("csv", tmp_path)
    with pytest.raises(UserError, match="needs --data-root"):
        load_caption_dataset("csv", None)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match=r"bad.jpg: cannot decode image"):
        cached_images([bad], 16, "train")


def test_image_cache_decodes_once_and_notices_changes(tmp_path, fresh_cache):
    path = tmp_path / "a.jpg"
    write_jpeg(path, colour=(10, 200, 10), size=(50, 20))
    first = cached_images([path], 16, "train")
    assert first.shape == (1, 3, 16, 16) and first.dtype == torch.uint8
    assert abs(int(first[0, 1].float().mean()) - 200) < 5
    files = list((fresh_cache / "tensors").glob("images-*.npy"))
    assert len(files) == 1
    assert torch.equal(cached_images([path], 16, "train"), first)
    assert len(list((fresh_cache / "tensors").glob("images-*.npy"))) == 1  # a hit, no new entry
    cached_images([path], 8, "train")                      # another resolution: another entry
    write_jpeg(path, colour=(200, 10, 10), size=(50, 20))  # changed content: another entry
    changed = cached_images([path], 16, "train")
    assert abs(int(changed[0, 0].float().mean()) - 200) < 5
    assert len(list((fresh_cache / "tensors").glob("images-*.npy"))) == 3


def test_parallel_decoding_gives_the_sequential_array_and_names_a_bad_file(tmp_path):
    from clipse.data.image_decode import BLOCK, decode_images

    paths = []
    for i in range(BLOCK + 5):  # two blocks, the second one short
        paths.append(tmp_path / f"{i}.jpg")
        write_jpeg(paths[-1], colour=(i * 3 % 256, 100, 255 - i), size=(40 + i % 7, 30))
    seen = []
    parallel = decode_images(paths, 16, workers=2, advance=seen.append)
    assert np.array_equal(parallel, decode_images(paths, 16, workers=1)) and sum(seen) == len(paths)
    (tmp_path / "3.jpg").write_bytes(b"broken")
    with pytest.raises(UserError, match=r"3.jpg: cannot decode image"):
        decode_images(paths, 16, workers=2)


def test_parallel_decoding_works_inside_a_daemon_worker(tmp_path):
    """Trials run in daemon processes, which may not start processes of their own."""
    import multiprocessing

    from clipse.data.image_decode import decode_images

    paths = []
    for i in range(70):
        paths.append(tmp_path / f"{i}.jpg")
        write_jpeg(paths[-1], colour=(i, 100, 50), size=(30, 30))
    worker = multiprocessing.get_context("spawn").Process(target=decode_images, args=(paths, 16),
                                                          kwargs={"workers": 2}, daemon=True)
    worker.start()
    worker.join(120)
    assert worker.exitcode == 0


def test_a_cached_split_is_a_memory_map_shared_through_the_page_cache(tmp_path, fresh_cache):
    path = tmp_path / "a.jpg"
    write_jpeg(path, colour=(10, 200, 10), size=(50, 20))
    for _ in range(2):  # as built, then as loaded: the tensor's data is the mapped file
        images = cached_images([path], 16, "train")
        entry = next((fresh_cache / "tensors").glob("images-*.npy"))
        mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(entry))]
        assert mapped and all(line.split()[1].endswith("p") for line in mapped)  # private: writes never reach the file
        assert any(int(m.split()[0].split("-")[0], 16) <= images.data_ptr() < int(m.split()[0].split("-")[1], 16)
                   for m in mapped), (hex(images.data_ptr()), mapped)
    before = entry.read_bytes()
    images += 1  # a stray write copies the page: no crash, the entry unchanged
    assert entry.read_bytes() == before and torch.equal(cached_images([path], 16, "train") + 1, images)


def test_an_entry_another_process_published_first_is_kept(tmp_path, fresh_cache, monkeypatch):
    """A mapped entry must never be replaced under the processes that map it."""
    path = tmp_path / "a.jpg"
    write_jpeg(path, colour=(10, 200, 10), size=(50, 20))
    first = cached_images([path], 16, "train")
    entry = next((fresh_cache / "tensors").glob("images-*.npy"))
    inode = entry.stat().st_ino
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: False if self == entry else real_is_file(self))  # a racing build
    again = cached_images([path], 16, "train")
    assert entry.stat().st_ino == inode and torch.equal(again, first)
    assert not list(entry.parent.glob("*.tmp"))


def test_an_empty_cache_entry_is_rebuilt(tmp_path, fresh_cache):
    path = tmp_path / "a.jpg"
    write_jpeg(path, colour=(10, 200, 10), size=(50, 20))
    first = cached_images([path], 16, "train").clone()
    entry = next((fresh_cache / "tensors").glob("images-*.npy"))
    entry.write_bytes(b"")
    assert torch.equal(cached_images([path], 16, "train"), first)


def test_token_cache(fresh_cache):
    calls = []

    def tokenize(texts):
        calls.append(len(texts))
        return torch.tensor([[len(t), 1] for t in texts])

    a = cached_tokens(["ab", "abc"], tokenize, "toy")
    b = cached_tokens(["ab", "abc"], tokenize, "toy")
    assert torch.equal(a, b) and calls == [2]
    cached_tokens(["ab", "abc"], tokenize, "other-tokenizer")
    assert calls == [2, 2]


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_shapes_deterministic_and_in_flickr_layout(tmp_path):
    spec = ShapesSpec(train_images=30, val_images=10, test_images=10, seed=5)
    a = ensure_shapes_dataset(spec, tmp_path / "a")
    b = ensure_shapes_dataset(spec, tmp_path / "b")
    assert _tree_digest(a) == _tree_digest(b)
    c = ensure_shapes_dataset(ShapesSpec(30, 10, 10, seed=6), tmp_path / "c")
    assert _tree_digest(a) != _tree_digest(c)
    assert (a / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    ds = load_caption_dataset("shapes", tmp_path / "a", shapes=spec)
    assert [len(ds.split(s).image_paths) for s in ("train", "val", "test")] == [30, 10, 10]
    assert all(ds.split(s).n_pairs == 5 * len(ds.split(s).image_paths) for s in ("train", "val", "test"))


def test_shapes_captions_fit_several_images():
    """Coarse captions are shared by many images (real false negatives); complete ones are rare."""
    ds = load_caption_dataset("shapes", shapes=ShapesSpec(200, 20, 20, seed=0))
    train = ds.split("train")
    images_of = [dict() for _ in range(5)]  # per detail level: caption text -> images it describes
    for k, caption in enumerate(train.captions):
        text = re.sub(r"^(a picture of |an image with |there is )?an? ", "", caption)
        images_of[k % 5].setdefault(text, set()).add(int(train.caption_image[k]))
    mean_images = [np.mean([len(v) for v in level.values()]) for level in images_of]
    assert mean_images[0] > 5          # "a red circle"
    assert mean_images[4] < 1.2        # every shape with size, colour, place and background
    assert all(a >= b for a, b in zip(mean_images, mean_images[1:]))  # more detail, fewer images


def test_split_tensors(tmp_path):
    ds = load_caption_dataset("shapes", tmp_path / "s", shapes=ShapesSpec(8, 4, 4))
    tokenize = lambda texts: torch.tensor([[len(t)] * 3 for t in texts])
    t = load_split_tensors(ds.split("val"), "val", 24, tokenize, "len")
    assert t.images.shape == (4, 3, 24, 24) and t.tokens.shape == (20, 3)
    assert t.caption_image.tolist() == [i for i in range(4) for _ in range(5)]


@pytest.mark.parametrize("n,batch", [(10, 4), (9, 4), (1, 4), (64, 64), (65, 64)])
def test_random_batches_cover_each_index_once(n, batch):
    batches = random_batches(n, batch, seed=1, epoch=2)
    sizes = {(10, 4): [4, 4, 2], (9, 4): [4, 5], (1, 4): [1], (64, 64): [64], (65, 64): [65]}[(n, batch)]
    assert [len(b) for b in batches] == sizes  # a last batch of one pair joins the one before
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))
    assert all(len(b) >= 2 for b in batches) or n == 1
    assert all(np.array_equal(x, y) for x, y in zip(batches, random_batches(n, batch, seed=1, epoch=2)))
    assert n < 4 or not np.array_equal(flat, np.concatenate(random_batches(n, batch, seed=1, epoch=3)))


def test_topical_batches_cover_once_deterministic_and_topical():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8)) * 10
    labels = rng.integers(0, 5, size=403)
    features = centres[labels] + rng.normal(size=(403, 8))
    sampler = TopicalBatchSampler(features, batch_size=16, seed=0, n_clusters=5)
    assert len(sampler.clusters) == 5
    for epoch in range(3):
        batches = sampler.batches(epoch)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(403))
        assert all(len(b) >= 2 for b in batches)
    again = TopicalBatchSampler(features, batch_size=16, seed=0, n_clusters=5).batches(1)
    assert all(np.array_equal(x, y) for x, y in zip(sampler.batches(1), again))
    # nearly all batches hold one true topic; consecutive batches change cluster
    batches = sampler.batches(0)
    pure = [len(set(labels[b])) == 1 for b in batches]
    assert np.mean(pure) > 0.8
    clusters = [sampler.labels[b[0]] for b in batches[:5]]
    assert len(set(clusters)) == 5


def test_topical_from_captions_auto_k():
    captions = [f"a {c} {s} number {i}" for i in range(50) for c in ("red", "blue", "green") for s in ("circle", "square")]
    sampler = TopicalBatchSampler.from_captions(captions, batch_size=8, seed=0)
    assert sampler.n_clusters == 300 // 32
    assert sorted(np.concatenate(sampler.batches(0)).tolist()) == list(range(300))


def _within_batch_similarity(captions: list[str], batches: list[np.ndarray]) -> float:
    """Mean cosine similarity of the TF-IDF rows of two captions in one batch."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    rows = TfidfVectorizer().fit_transform(captions).toarray()
    means = []
    for batch in batches:
        block = rows[batch] @ rows[batch].T
        means.append((block.sum() - np.trace(block)) / (len(batch) * (len(batch) - 1)))
    return float(np.mean(means))


def test_topical_batches_from_captions_are_more_homogeneous_than_random_ones():
    rng = np.random.default_rng(0)
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "cross")
    places = ("top left", "bottom right", "centre", "top", "bottom")
    captions = [f"a {rng.choice(['small', 'large'])} {rng.choice(colours)} {rng.choice(shapes)} in the "
                f"{rng.choice(places)}" for _ in range(640)]
    topical = TopicalBatchSampler.from_captions(captions, batch_size=16, seed=0).batches(0)
    random = random_batches(len(captions), 16, seed=0, epoch=0)
    assert _within_batch_similarity(captions, topical) > 1.5 * _within_batch_similarity(captions, random)


@pytest.mark.parametrize("n,batch,clusters", [(10, 8, 1), (64, 8, 2), (1000, 8, 31), (100_000, 8, 64)])
def test_auto_cluster_count_gives_about_four_batches_per_cluster(n, batch, clusters):
    assert auto_cluster_count(n, batch) == clusters


def test_topical_batches_with_a_given_cluster_count():
    captions = [f"a {c} {s} number {i}" for i in range(20) for c in ("red", "blue") for s in ("circle", "square")]
    sampler = TopicalBatchSampler.from_captions(captions, batch_size=4, seed=0, n_clusters=3)
    assert sampler.n_clusters == 3 and len(sampler.clusters) == 3


def test_a_single_leftover_pair_joins_the_last_batch():
    """Clusters of 16 and 17 in batches of 16: one pair is left over and may not form a batch alone."""
    features = np.concatenate([np.zeros((16, 2)), np.full((17, 2), 100.0)]) + np.random.default_rng(0).normal(
        size=(33, 2))
    sampler = TopicalBatchSampler(features, batch_size=16, seed=0, n_clusters=2)
    assert sorted(len(c) for c in sampler.clusters) == [16, 17]
    batches = sampler.batches(0)
    assert sorted(len(b) for b in batches) == [16, 17]
    assert sorted(np.concatenate(batches).tolist()) == list(range(33))


def test_each_epoch_visits_the_clusters_in_its_own_order():
    """Round-robin over the clusters starts where the epoch's seed says, not at cluster 0 every
    epoch (which would give cluster 0 the first step of every epoch)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 8)) * 10
    features = centres[rng.integers(0, 6, size=600)] + rng.normal(size=(600, 8))
    sampler = TopicalBatchSampler(features, batch_size=16, seed=0, n_clusters=6)
    orders = [tuple(sampler.labels[b[0]] for b in sampler.batches(epoch)[:6]) for epoch in range(6)]
    assert all(len(set(order)) == 6 for order in orders)  # each epoch cycles through every cluster
    assert len({order[0] for order in orders}) > 1 and len(set(orders)) == 6


def test_shuffled_captions_are_a_seeded_share_of_the_training_pairs(tmp_path):
    from clipse.config import TrainConfig
    from clipse.training.assembly import model_for, split_tensors

    loaded = model_for(TrainConfig(pretrained="none"))
    split = split_tensors(load_caption_dataset("shapes", tmp_path / "s", shapes=ShapesSpec(40, 4, 4)), "train", loaded)
    noisy = split.with_shuffled_captions(0.5, seed=3)
    moved = [k for k in range(len(split.captions)) if noisy.captions[k] != split.captions[k]]
    assert 0.3 * len(split.captions) < len(moved) <= 0.5 * len(split.captions)  # a shuffled caption may land home
    assert sorted(noisy.captions) == sorted(split.captions) and torch.equal(noisy.images, split.images)
    for k in moved:  # tokens and ground truth travel with their caption
        source = split.captions.index(noisy.captions[k])
        assert torch.equal(noisy.tokens[k], split.tokens[source])
        assert torch.equal(noisy.truth.caption_facts[k], split.truth.caption_facts[source])
    again = split.with_shuffled_captions(0.5, seed=3)
    assert again.captions == noisy.captions and split.with_shuffled_captions(0.0, seed=3) is split
