"""`sarformer convert FAMILY`: a file that is not a checkpoint, a missing file, or a checkpoint of
another family ends with exit status 1 and one line on stderr naming the file, for every family,
and writes no output (the beit converter used to end in a traceback)."""

import pytest

torch = pytest.importorskip("torch")

from sarformer_jax.cli import main

FAMILY_ARGS = {
    "sam": [],
    "beit": ["--model", "auto"],
    "sarformer": ["--config", "tiny"],
}


def _junk(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint at all\n" * 8)
    return path


def _other_family(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 4)}, path)
    return path


@pytest.mark.parametrize("family", sorted(FAMILY_ARGS))
@pytest.mark.parametrize("make", [_junk, _other_family, lambda p: p / "missing.pth"],
                         ids=["junk", "other_family", "missing"])
def test_unreadable_or_foreign_checkpoint_is_one_line_error(family, make, tmp_path, capsys):
    src = make(tmp_path)
    dst = tmp_path / "out.npz"
    rc = main(["convert", family, str(src), str(dst), *FAMILY_ARGS[family]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1, err
    assert err[0].startswith(f"sarformer convert {family}: ") and src.name in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not dst.exists()
