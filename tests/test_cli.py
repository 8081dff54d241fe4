import json

from PIL import Image

from jaxmr.cli import main


def test_data_info_and_errors(capsys, tsv_folder):
    assert main(["data", "info", f"captions:{tsv_folder}", "--split", "dev"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 2 and info["split"] == "val" and info["split_sizes"] == {"train": 8, "val": 2, "test": 2}
    assert main(["data", "info", "shapes:n=oops"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shapes: option n needs a int") and "Traceback" not in err


def test_preview_and_tokenizer(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", "shapes:n=20", "--n", "6", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 128, 2 * (128 + 54))
    assert main(["tokenizer", "train", "shapes:n=50", "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists()


def test_model_info(capsys):
    assert main(["model", "info", "tiny", "b16"]) == 0
    out = capsys.readouterr().out
    assert "149,620,738" in out and "tiny" in out
    assert main(["model", "info", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
