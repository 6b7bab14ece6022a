"""`python -m finetune.predict`: one CSV row per image, unreadable files reported in their row, no overwriting."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, offline_env, run_module, run_module_in_process

from finetune.data.images import load_rgb
from finetune.data.transforms import eval_transform
from finetune.model.module import ImageClassifier
from finetune.predict import check_output_file, main

UNREADABLE = ("empty.jpg", "nested/deeper/truncated.png", "notes.jpg")


def make_mixed_folder(root: Path, image_folder: Path) -> list[str]:
    """Two images per class in nested folders, three unreadable ones, and files to be skipped; returns the paths
    (relative to root) the prediction must cover, sorted."""
    expected = []
    for kind in CLASSES:
        for index, folder in enumerate(("", f"{kind}_dir")):
            relative = Path(folder) / f"{kind}_{index}.{'PNG' if index else 'png'}"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image_folder / kind / f"{kind}_{index:03d}.png", root / relative)
            expected.append(str(relative))
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "empty.jpg").write_bytes(b"")
    (root / "nested" / "deeper" / "truncated.png").write_bytes(
        (image_folder / "circle" / "circle_005.png").read_bytes()[:200]
    )
    (root / "notes.jpg").write_text("not an image, whatever its name says\n")
    # Skipped: not images by name, hidden, or in a hidden folder.
    (root / "readme.txt").write_text("hello")
    shutil.copy(image_folder / "circle" / "circle_000.png", root / ".hidden.png")
    (root / ".cache").mkdir()
    shutil.copy(image_folder / "circle" / "circle_000.png", root / ".cache" / "c.png")
    return sorted([*expected, *UNREADABLE])


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames), list(reader)


@pytest.mark.slow
def test_predicts_a_folder_one_row_per_image(tmp_path, trained_run, image_folder):
    expected = make_mixed_folder(tmp_path / "photos", image_folder)
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    output = tmp_path / "out" / "deeper" / "predictions.csv"  # its folders do not exist yet
    result = run_module(tmp_path, "finetune.predict", f"checkpoint={checkpoint}", "input=photos", f"output={output}")
    assert result.returncode == 0, result.stderr
    assert f"predicted 6 of 9 image(s), 3 unreadable; written to {output}" in result.stdout
    assert "image size 32 (data.image_size of the run" in result.stderr  # the size it trained at

    columns, rows = read_rows(output)
    assert columns == [
        "path",
        "class",
        "probability",
        "top2_class",
        "top2_probability",
        "top3_class",
        "top3_probability",
        "error",
    ]
    assert [row["path"] for row in rows] == [str(Path("photos") / path) for path in expected]
    for row in rows:
        if row["path"].endswith(UNREADABLE):
            assert row["error"] and not row["class"] and not row["probability"], row
            continue
        assert row["error"] == ""
        ranked = [(row["class"], float(row["probability"]))] + [
            (row[f"top{rank}_class"], float(row[f"top{rank}_probability"])) for rank in (2, 3)
        ]
        assert sorted(name for name, _ in ranked) == sorted(CLASSES)  # names from the checkpoint, each once
        probabilities = [p for _, p in ranked]
        assert probabilities == sorted(probabilities, reverse=True)  # top-1 is the argmax
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)  # all 3 classes: the whole distribution
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert "UnidentifiedImageError" in errors[str(Path("photos") / "empty.jpg")]
    assert "truncated" in errors[str(Path("photos") / "nested" / "deeper" / "truncated.png")]

    # The same probabilities as the model in this process, fed as the run trained (32 px).
    model = ImageClassifier.from_checkpoint(str(checkpoint)).eval()
    first = rows[0]
    with torch.inference_mode():
        image = eval_transform(model.preprocessing.at_size(32))(load_rgb(tmp_path / first["path"]))
        probabilities = model(image[None]).softmax(dim=1)[0]
    assert model.class_names[int(probabilities.argmax())] == first["class"]
    assert float(probabilities.max()) == pytest.approx(float(first["probability"]), abs=1e-5)


@pytest.mark.slow
def test_single_image_and_no_overwriting(tmp_path, trained_run, image_folder):
    image = image_folder / "square" / "square_003.png"
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    output = tmp_path / "one.csv"
    arguments = (f"checkpoint={checkpoint}", f"input={image}", f"output={output}", "top_k=1", "num_workers=0")
    result = run_module(tmp_path, "finetune.predict", *arguments)
    assert result.returncode == 0, result.stderr
    columns, rows = read_rows(output)
    assert columns == ["path", "class", "probability", "error"]
    assert len(rows) == 1 and rows[0]["path"] == str(image) and rows[0]["class"] in CLASSES
    assert 1 / len(CLASSES) <= float(rows[0]["probability"]) <= 1
    written = output.read_bytes()

    again = run_module_in_process(tmp_path, "finetune.predict", *arguments)
    assert again.returncode == 2
    assert "Traceback" not in again.stderr
    assert again.stderr.strip() == (
        f"error: {output} already exists; pass overwrite=true to replace it, or another output="
    )
    assert output.read_bytes() == written


def test_overwrite_true_and_folders_as_output(tmp_path):
    existing = tmp_path / "p.csv"
    existing.write_text("old")
    check_output_file(existing, overwrite=True)
    check_output_file(tmp_path / "new" / "p.csv", overwrite=False)
    with pytest.raises(Exception, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["checkpoint=a.ckpt", "input=x", "output=y.csv", "topk=2"], "unknown key 'topk' (did you mean top_k?)"),
        (["checkpoint=a.ckpt", "output=y.csv"], "missing input="),
        (["checkpoint=a.ckpt", "input=x", "output=y.csv", "top_k=many"], "top_k: Value 'many'"),
        (["a.ckpt"], "'a.ckpt' is not key=value"),
    ],
)
def test_bad_arguments_give_one_line_naming_the_valid_keys(tmp_path, capsys, arguments, message):
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert "valid keys: checkpoint, input, output (required); batch_size, device, image_size" in error


def test_missing_checkpoint_and_input_are_one_line_errors(tmp_path, capsys, image_folder):
    assert main([f"checkpoint={tmp_path / 'none.ckpt'}", f"input={image_folder}", f"output={tmp_path / 'p.csv'}"]) == 2
    assert f"error: checkpoint {tmp_path / 'none.ckpt'} does not exist" in capsys.readouterr().err
    assert main(["checkpoint=x.ckpt", f"input={tmp_path / 'nothing'}", f"output={tmp_path / 'p.csv'}"]) == 2
    assert f"input {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_writes_only_its_output_and_full_error_shows_the_traceback(tmp_path, trained_run, image_folder):
    # A Hydra app by default writes outputs/<date>/ with .hydra/ and a log: predict writes its CSV only.
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    image = image_folder / "circle" / "circle_000.png"
    result = run_module(
        tmp_path, "finetune.predict", f"checkpoint={checkpoint}", f"input={image}", "output=p.csv", "num_workers=0"
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.csv"]

    full = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.predict",
            f"checkpoint={checkpoint}",
            f"input={tmp_path / 'nothing'}",
            "output=q.csv",
        ],
        cwd=tmp_path,
        env=offline_env(tmp_path) | {"HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode != 0 and "Traceback" in full.stderr and "UsageError: input" in full.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.csv"]


def test_help_prints_the_usage(capsys):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m finetune.predict checkpoint=<ckpt>")


def test_workers_default_to_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    # The same default as training (CPU affinity, a SLURM job's allocation), not os.cpu_count().
    from finetune import predict

    class Chosen(Exception):
        pass

    def default_num_workers():
        raise Chosen

    monkeypatch.setattr(predict, "default_num_workers", default_num_workers)
    with pytest.raises(Chosen):
        predict.classify(None, [], batch_size=1, num_workers=None)
