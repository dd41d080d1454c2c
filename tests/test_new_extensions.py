"""A dataset format and an executor backend with flags of its own, each defined only here: adding
either needs no edit anywhere else in clipse (as ``test_new_loss.py`` shows for a loss)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from clipse.config import TrainConfig
from clipse.data import load_caption_dataset
from clipse.data.formats import FORMATS, DataRequest, DatasetFormat, register_format
from clipse.data.formats.common import assemble
from clipse.executors import (
    BACKENDS,
    ExecutorOptions,
    executor_from_options,
    register_backend,
)
from clipse.executors.inline import InlineExecutor
from clipse.search.command import SearchOptions
from clipse.search.command import build_parser as search_parser
from clipse.train import build_parser, config_from_args
from clipse.util.fields import from_arguments, setting


class PipeFile(DatasetFormat):
    """``image.png|caption|split`` lines in ``pairs.txt`` beside the images."""

    name = "pipes"
    help = "image|caption|split lines in pairs.txt"

    @classmethod
    def read(cls, request: DataRequest):
        lines = (Path(request.root) / "pairs.txt").read_text().splitlines()
        split_of_image, captions = {}, {}
        for line in lines:
            image, caption, split = line.split("|")
            split_of_image[image] = split
            captions.setdefault(image, []).append(caption)
        return assemble(Path(request.root) / "pairs.txt", "pipes", split_of_image, captions,
                        {image: Path(request.root) / image for image in split_of_image})


@pytest.fixture
def pipes_format(monkeypatch, tmp_path):
    monkeypatch.setitem(FORMATS, PipeFile.name, PipeFile)
    rows = []
    for index, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2):
        Image.new("RGB", (8, 8), (index * 30, 0, 0)).save(tmp_path / f"{index}.png")
        rows.append(f"{index}.png|a picture number {index}|{split}")
    (tmp_path / "pairs.txt").write_text("\n".join(rows))
    return tmp_path


def test_a_format_registered_in_one_module_is_a_data_choice(pipes_format):
    register_format(PipeFile)  # registering the same class again is harmless
    dataset = load_caption_dataset("pipes", pipes_format)
    assert [len(dataset.split(s).image_paths) for s in ("train", "val", "test")] == [4, 2, 2]
    args = build_parser().parse_args(["--data", "pipes", "--data-root", str(pipes_format)])
    assert config_from_args(args).validate().data == "pipes"
    assert "pipes" in build_parser().format_help()
    with pytest.raises(Exception, match="needs data_root"):
        TrainConfig(data="pipes").validate()


@dataclass
class EchoOptions:
    """Echo executor (--executor echo)"""

    greeting: str = setting("hello", "what the echo backend says first", flag="--echo-greeting")


class EchoExecutor(InlineExecutor):
    name = "echo"
    options_class = EchoOptions

    @classmethod
    def from_options(cls, options, folder, job_name):
        executor = cls()
        executor.greeting = cls.own_options(options).greeting
        return executor


def test_a_backend_with_flags_is_one_module(monkeypatch, tmp_path):
    monkeypatch.setitem(BACKENDS, EchoExecutor.name, EchoExecutor)
    register_backend(EchoExecutor)
    parser = search_parser()
    assert "--echo-greeting" in parser.format_help() and "Echo executor" in parser.format_help()
    args = parser.parse_args(["--space", "baseline", "--trials", "1", "--executor", "echo", "--echo-greeting", "hi"])
    options = from_arguments(SearchOptions, args)
    assert options.execution.backend_options["echo"] == EchoOptions("hi")
    assert executor_from_options(options.execution, tmp_path).greeting == "hi"
    assert executor_from_options(ExecutorOptions(executor="echo"), tmp_path).greeting == "hello"  # its default
