import numpy as np

from tinyllm.folders import move_into_place, scratch_folder


def test_a_folder_moved_into_place_replaces_the_old_one_whose_mapped_files_stay_readable(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    np.save(out / "ids.npy", np.arange(5))
    mapped = np.load(out / "ids.npy", mmap_mode="r")  # a training process reading the old set
    (tmp_path / "set.tmp").mkdir()
    (tmp_path / "set.tmp" / "stale").write_text("left by a failed write")

    tmp = scratch_folder(out)
    assert tmp == tmp_path / "set.tmp" and list(tmp.iterdir()) == []
    np.save(tmp / "ids.npy", np.arange(5) * 10)
    move_into_place(tmp, out)

    assert np.load(out / "ids.npy").tolist() == [0, 10, 20, 30, 40]
    assert mapped.tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_new_folder_is_moved_into_place(tmp_path):
    out = tmp_path / "a" / "ckpt"
    tmp = scratch_folder(out)
    (tmp / "config.json").write_text("{}")
    move_into_place(tmp, out)
    assert (out / "config.json").read_text() == "{}" and not tmp.exists()
