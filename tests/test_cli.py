"""The train and eval commands as a user runs them: outputs, exit codes, one-line errors."""

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from clipse.eval_retrieval import main as eval_main
from clipse.evaluation.metrics import METRIC_KEYS, TIE_KEYS
from clipse.evaluation.zeroshot import ZEROSHOT_KEYS
from clipse.runs.registry import REGISTRY_COLUMNS, append_row
from clipse.train import main as train_main

TINY = ["--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
        "--batch-size", "16", "--threads", "1", "--no-progress"]


def run(module, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def in_process(main, args, capsys):
    """Run a command's main() here (subprocesses cost seconds of imports each); same result shape."""
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.slow
def test_train_then_eval_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("loss: sanw_debias\nalpha: 0.2\ndelta: 0.3\nlambda: 1.0\nepochs: 3\n")
    run_dir = tmp_path / "run"
    trained = run("clipse.train", "--config", str(config), "--epochs", "1", *TINY, "--run-dir", str(run_dir),
                  "--data-root", str(tmp_path / "shapes"), "--registry", str(tmp_path / "reg.csv"))
    assert trained.returncode == 0, trained.stderr
    assert "completed after 1 epoch(s)" in trained.stdout and str(run_dir) in trained.stdout
    saved = (run_dir / "config.yaml").read_text()
    assert "loss: sanw_debias" in saved and "epochs: 1" in saved and "lambda: 1.0" in saved

    # the eval command in this process (the same main(); a subprocess costs seconds of imports)
    as_json = in_process(eval_main, ["--checkpoint", str(run_dir / "best.pt"), "--split", "test", "--json"], capsys)
    assert as_json.returncode == 0, as_json.stderr
    metrics = json.loads(as_json.stdout)
    assert list(metrics) == list(METRIC_KEYS + TIE_KEYS + ZEROSHOT_KEYS)  # the shapes data carries its zero-shot set
    assert metrics["tie_share"] == 0.0  # a trained model ties nothing but identical captions
    table = in_process(eval_main, ["--checkpoint", str(run_dir / "best.pt"), "--split", "val"], capsys)
    assert table.returncode == 0 and "image->text" in table.stdout and "12 images, 60 captions" in table.stdout
    assert "tied with other content: 0.00% of images, 0.00% of captions" in table.stdout
    # the val table agrees with what training logged for the best epoch
    best = pd.read_csv(run_dir / "epochs.csv").iloc[0]
    assert f"{100 * best['val_i2t_r1']:8.2f}" in table.stdout


@pytest.mark.parametrize("args,fragments", [
    (["--data", "flickr8k", "--data-root", "/nonexistent/flickr"], ["/nonexistent/flickr: data folder not found"]),
    (["--data", "csv"], ["data=csv needs data_root"]),
    (["--loss", "sanw_bandpass", "--m1", "0.9", "--m2", "0.8"], ["m1 < m2"]),
    (["--pretrained", "/nope/model.pt"], ["/nope/model.pt: checkpoint file not found"]),
    (["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"], ["not in the local cache", "pre-stage"]),
    (["--config", "/nope/run.yaml"], ["/nope/run.yaml: file not found"]),
    (["--affinity", "truth", "--data", "karpathy", "--data-root", "/x/dataset_coco.json"],
     ["affinity=truth needs data that knows which captions describe which images"]),
    (["--pretrained", "shapes-pretrained", "--model", "clipse-small"], ["shapes-pretrained is a clipse-tiny model"]),
])
def test_train_user_errors_are_one_line(tmp_path, args, fragments, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = in_process(train_main, [*args, "--run-dir", str(tmp_path / "r"), "--registry", str(tmp_path / "x.csv")],
                        capsys)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("text,fragments", [
    ("lr: [1, 2\n", ["run.yaml:", "not valid YAML"]),
    ("epoch: 3\n", ["unknown setting 'epoch'", "did you mean 'epochs'"]),
    ("epochs: many\n", ["'epochs' must be int, got 'many'"]),
    ("- a\n- b\n", ["expected a mapping"]),
])
def test_bad_config_file(tmp_path, text, fragments, capsys):
    (tmp_path / "run.yaml").write_text(text)
    assert_one_line_error(in_process(train_main, ["--config", str(tmp_path / "run.yaml")], capsys), *fragments)


@pytest.mark.slow
def test_user_error_exit_status_through_python_m(tmp_path, capsys):
    assert_one_line_error(run("clipse.train", "--data", "karpathy", "--data-root", str(tmp_path / "none")),
                          "none: data path not found")
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal, exit status 2 as well
        train_main(["--loss", "hinge"])
    assert refused.value.code == 2 and "invalid choice: 'hinge'" in capsys.readouterr().err


def test_help_and_model_list(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "--lambda" in capsys.readouterr().out
    listed = in_process(train_main, ["--list-models"], capsys).stdout.split()
    assert listed[:3] == ["clipse-small", "clipse-tiny", "clipse-tiny-64"]
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    assert "--checkpoint" in capsys.readouterr().out


def test_eval_user_errors(tmp_path, capsys):
    assert_one_line_error(in_process(eval_main, ["--checkpoint", str(tmp_path / "none.pt")], capsys),
                          "none.pt: checkpoint file not found")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(1)}, foreign)
    assert_one_line_error(in_process(eval_main, ["--checkpoint", str(foreign)], capsys), "not a clipse checkpoint")


def _append_many(path, worker):
    for i in range(25):
        append_row(Path(path), {"run_id": f"w{worker}-{i}", "params": '{"a, b": "x\\ny"}', "status": "completed"})


@pytest.mark.slow
def test_registry_survives_concurrent_appends(tmp_path):
    path = tmp_path / "registry.csv"
    context = multiprocessing.get_context("fork")  # separate processes, without importing torch again
    workers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    table = pd.read_csv(path)
    assert list(table.columns) == REGISTRY_COLUMNS
    assert len(table) == 100 and table["run_id"].is_unique
    assert (table["params"] == '{"a, b": "x\\ny"}').all()


@pytest.mark.parametrize("value,required", [("1", True), ("0", False), ("", False), (None, False)])
def test_require_services_means_what_it_says(monkeypatch, value, required):
    from conftest import services_required

    if value is None:
        monkeypatch.delenv("CLIPSE_REQUIRE_SERVICES", raising=False)
    else:
        monkeypatch.setenv("CLIPSE_REQUIRE_SERVICES", value)
    assert services_required() is required
