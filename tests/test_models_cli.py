import json

import pytest
from transformers import BertConfig, BertModel

from conftest import save_tiny_model
from mg_editing.cli import main
from mg_editing.models import load_model_and_tokenizer, resolve_dtype


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-codegen"), "codegen")


def test_load_by_path(saved_model):
    model, tok = load_model_and_tokenizer(saved_model, dtype="fp32")
    assert type(model).__name__ == "CodeGenForCausalLM" and not model.training
    assert len(tok) == 600


def test_non_causal_lm_is_refused(tmp_path):
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal LM"):
        load_model_and_tokenizer(tmp_path)


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")


def test_score_command(saved_model, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["score", "--model", str(saved_model), "--split", "dev", "--limit", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Model | RoBERTa-Neg" in printed and "Average" in printed
    data = json.loads(out.read_text())
    assert len(data["p_he"]) == 20 and 0 <= data["fb_score"] <= 2 and len(data["ids"]) == 20


def test_cli_errors_are_one_line(saved_model, capsys):
    assert main(["score", "--model", str(saved_model), "--split", "validation"]) == 2
    err = capsys.readouterr().err
    assert "unknown split" in err and "Traceback" not in err
    assert main(["score", "--model", "/no/such/model/dir"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_dataset_build_command(tmp_path, capsys):
    assert main(["dataset", "build", "--out", str(tmp_path / "cgb")]) == 0
    assert (tmp_path / "cgb" / "data" / "test.parquet").is_file()


def test_package_level_functions_survive_submodule_imports():
    import mg_editing.edit  # noqa: F401
    import mg_editing.locate  # noqa: F401
    from mg_editing import edit, load_codegenbias, locate

    assert callable(edit) and callable(locate) and callable(load_codegenbias)
