"""Tied models saved with a redundant lm_head.weight: accepted when it is the embedding, refused otherwise."""
from tests.converters.test_bad_input import assert_nothing_written, convert, copy_model, edit_weights


def test_identical_tied_head_is_accepted_and_verified(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path, family="llama3-tied")
    edit_weights(hf, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "verification.json").is_file()


def test_tied_head_that_differs_is_an_error(tmp_path, hf_model_dirs, capsys):
    hf = copy_model(hf_model_dirs, tmp_path, family="llama3-tied")
    edit_weights(hf, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1))
    code, err = convert(capsys, "hf2mcore", hf, tmp_path / "out")
    assert code == 1
    assert "tie_word_embeddings=true" in err and "lm_head.weight" in err and "model.embed_tokens.weight" in err
    assert_nothing_written(tmp_path)
