import pytest

from tinyllm.errors import UserError
from tinyllm.folders import replaced_folder


def test_a_written_folder_replaces_the_old_one_and_leaves_no_scratch(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "ids").write_text("old")
    (tmp_path / "set.tmp").mkdir()
    (tmp_path / "set.tmp" / "stale").write_text("left by a killed write")
    (tmp_path / "set.old").write_text("a file where the old folder goes")

    with replaced_folder(out) as tmp:
        assert tmp == tmp_path / "set.tmp" and list(tmp.iterdir()) == []
        (tmp / "ids").write_text("new")
        assert (out / "ids").read_text() == "old"  # readers see the old folder until the block ends

    assert (out / "ids").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_failed_write_leaves_the_old_folder_as_it_was(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_text("trained")
    with pytest.raises(RuntimeError, match="disk full"), replaced_folder(out) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")
    assert (out / "model.safetensors").read_text() == "trained"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_new_folder_is_created_with_its_parents(tmp_path):
    out = tmp_path / "a" / "ckpt"
    with replaced_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}" and not tmp.exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_file_or_link_in_the_folders_place_is_refused_by_name(tmp_path, kind):
    target = tmp_path / "elsewhere"
    target.mkdir()
    out = tmp_path / "tokens"
    if kind == "file":
        out.write_text("not a folder")
    else:
        out.symlink_to(target)
    with pytest.raises(UserError, match=f"{out}: not a folder"), replaced_folder(out):
        pass
    assert out.exists() and list(target.iterdir()) == []  # nothing written through the link
