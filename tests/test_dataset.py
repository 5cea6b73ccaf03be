"""Tests for ImageDataset, SyntheticDataset, open_dataset and scripts/dataset_tool.py."""
import importlib.util
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest

import training.data.dataset as dataset_mod
from training.data.dataset import DatasetError, ImageDataset, open_dataset
from training.data.synthetic import SyntheticDataset

# Load scripts/dataset_tool.py by path (scripts/ is not a package).
_spec = importlib.util.spec_from_file_location(
    "dataset_tool", os.path.join(os.path.dirname(__file__), "..", "scripts", "dataset_tool.py"))
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
dataset_tool = _tool.main


# Write a random (seeded) RGB or grayscale PNG of the given size and return its pixels as HWC/HW uint8.
def _png(path, size=(8, 8), mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    arr = rng.randint(0, 256, size=shape, dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(arr, mode).save(path)
    return arr


# A folder of n 8x8 RGB images, two of them in a subfolder.
def _folder(tmp_path, n=4, name="data"):
    root = tmp_path / name
    for i in range(n):
        sub = "sub/" if i >= n - 2 else ""
        _png(str(root / f"{sub}img{i}.png"), seed=i)
    return root


# Zip a folder (stored or deflated) into `dest`.
def _zip(folder, dest, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(dest, "w", compression=compression) as zf:
        for dirpath, _, files in os.walk(folder):
            for f in files:
                full = os.path.join(dirpath, f)
                zf.write(full, os.path.relpath(full, folder).replace(os.sep, "/"))
    return dest


# Write dataset.json at a folder's root (a dict as JSON, or a raw string for broken files).
def _write_json(root, obj):
    (root / "dataset.json").write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


# The same images read from a folder, a stored zip and a deflated zip decode identically.
def test_folder_and_zip_give_identical_arrays(tmp_path):
    root = _folder(tmp_path)
    a = ImageDataset(str(root))
    for comp in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        b = ImageDataset(_zip(root, str(tmp_path / f"data{comp}.zip"), comp))
        assert len(a) == len(b) == a.raw_size == 4
        assert b.image_shape == a.image_shape == [3, 8, 8]
        for i in range(len(a)):
            assert a[i][0].dtype == np.uint8
            np.testing.assert_array_equal(a[i][0], b[i][0])
    assert a.name == "data" and b.name == f"data{zipfile.ZIP_DEFLATED}"
    # The sorted order puts img0, img1 first; check the decoded pixels against what was written.
    np.testing.assert_array_equal(a[0][0], _png(str(tmp_path / "ref.png"), seed=0).transpose(2, 0, 1))
    # A pickled zip dataset (as sent to spawned DataLoader workers) still reads.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(b))[3][0], a[3][0])


# Integer class labels become one-hot vectors; without use_labels there are none.
def test_int_labels_are_one_hot(tmp_path):
    root = _folder(tmp_path)
    names = ["img0.png", "img1.png", "sub/img2.png", "sub/img3.png"]
    _write_json(root, {"labels": [[n, c] for n, c in zip(names, [2, 0, 4, 2])]})
    ds = ImageDataset(str(root), use_labels=True)
    assert ds.has_labels and ds.label_dim == 5 and ds.label_shape == [5]
    assert ds[2][1].dtype == np.float32
    np.testing.assert_array_equal(ds[2][1], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(ds.get_label(0), [0, 0, 1, 0, 0])
    plain = ImageDataset(str(root))
    assert not plain.has_labels and plain.label_dim == 0 and plain[0][1].shape == (0,)


# List labels are returned as float32 vectors.
def test_float_vector_labels(tmp_path):
    root = _folder(tmp_path)
    names = ["img0.png", "img1.png", "sub/img2.png", "sub/img3.png"]
    _write_json(root, {"labels": [[n, [i * 0.5, -1.0, 3]] for i, n in enumerate(names)]})
    ds = ImageDataset(_zip(root, str(tmp_path / "d.zip")), use_labels=True)
    assert ds.label_dim == 3
    np.testing.assert_allclose(ds[3][1], [1.5, -1.0, 3.0])


# xflip appends an exact mirror of every image, with the same label.
def test_xflip_doubles_and_mirrors(tmp_path):
    root = _folder(tmp_path)
    _write_json(root, {"labels": [[n, i] for i, n in enumerate(["img0.png", "img1.png", "sub/img2.png", "sub/img3.png"])]})
    ds = ImageDataset(str(root), xflip=True, use_labels=True)
    assert len(ds) == 8
    for i in range(4):
        img, label = ds[i]
        flipped, flabel = ds[i + 4]
        np.testing.assert_array_equal(flipped, img[:, :, ::-1])
        assert not np.array_equal(flipped, img)
        np.testing.assert_array_equal(flabel, label)
    with pytest.raises(IndexError):
        ds[8]


# max_size keeps a subset that depends only on random_seed.
def test_max_size_is_a_seeded_subset(tmp_path):
    root = _folder(tmp_path, n=6)
    full = ImageDataset(str(root))
    a = ImageDataset(str(root), max_size=3, random_seed=1)
    b = ImageDataset(str(root), max_size=3, random_seed=1)
    assert len(a) == 3 and a.raw_size == 6
    names = [a.get_fname(i) for i in range(3)]
    assert names == [b.get_fname(i) for i in range(3)]
    subsets = {tuple(ImageDataset(str(root), max_size=3, random_seed=s).get_fname(i) for i in range(3))
               for s in range(8)}
    assert len(subsets) > 1
    k = [full.get_fname(i) for i in range(6)].index(names[0])
    np.testing.assert_array_equal(a[0][0], full[k][0])


# All-grayscale stays 1 channel; one color image turns the dataset RGB.
def test_grayscale_channels(tmp_path):
    root = tmp_path / "gray"
    g = _png(str(root / "a.png"), mode="L")
    _png(str(root / "b.png"), mode="L", seed=1)
    ds = ImageDataset(str(root))
    assert ds.num_channels == 1 and ds[0][0].shape == (1, 8, 8)
    np.testing.assert_array_equal(ds[0][0][0], g)
    _png(str(root / "c.png"), mode="RGB", seed=2)  # One color image makes the whole dataset RGB.
    ds = ImageDataset(str(root))
    assert ds.num_channels == 3 and ds[0][0].shape == (3, 8, 8)
    np.testing.assert_array_equal(ds[0][0], np.stack([g] * 3))


# Missing paths and image-less folders fail with their names.
def test_missing_path_and_empty_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageDataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=str(empty)):
        ImageDataset(str(empty))


# An image whose size differs from the first is named in the error.
def test_mixed_sizes_name_the_file(tmp_path):
    root = _folder(tmp_path)
    _png(str(root / "sub/zbig.png"), size=(16, 16))
    with pytest.raises(DatasetError, match=r"zbig\.png.*16x16.*8x8"):
        ImageDataset(str(root))


# Truncated files are caught at construction, in folders and zips.
def test_truncated_file_names_the_file(tmp_path):
    root = _folder(tmp_path)
    bad = root / "img1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"img1\.png.*(corrupt|truncated)"):
        ImageDataset(str(root))
    with pytest.raises(DatasetError, match=r"img1\.png"):
        ImageDataset(_zip(root, str(tmp_path / "t.zip")))


# Non-square or non-power-of-two images point the user to dataset_tool.
def test_non_power_of_two_mentions_dataset_tool(tmp_path):
    root = tmp_path / "odd"
    _png(str(root / "a.png"), size=(12, 12))
    with pytest.raises(DatasetError, match=r"a\.png.*12x12.*scripts/dataset_tool\.py"):
        ImageDataset(str(root))
    root2 = tmp_path / "rect"
    _png(str(root2 / "a.png"), size=(16, 8))
    with pytest.raises(DatasetError, match=r"a\.png.*16x8.*dataset_tool"):
        ImageDataset(str(root2))


# A wrong requested resolution and RGBA images are refused with clear messages.
def test_resolution_mismatch_and_alpha_are_refused(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(DatasetError, match=r"8x8.*resolution=16"):
        ImageDataset(str(root), resolution=16)
    assert ImageDataset(str(root), resolution=8).resolution == 8
    PIL.Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(root / "sub" / "zalpha.png")
    with pytest.raises(DatasetError, match=r"zalpha\.png.*alpha.*dataset_tool"):
        ImageDataset(str(root))


# Unparseable JSON and wrongly typed labels name dataset.json (and the image).
def test_bad_dataset_json(tmp_path):
    root = _folder(tmp_path)
    _write_json(root, '{"labels": [["img0.png", 1],')
    with pytest.raises(DatasetError, match=r"dataset\.json.*not valid JSON"):
        ImageDataset(str(root), use_labels=True)
    _write_json(root, {"labels": [["img0.png", 1], ["img1.png", "cat"], ["sub/img2.png", 0], ["sub/img3.png", 0]]})
    with pytest.raises(DatasetError, match=r"dataset\.json.*img1\.png.*'cat'"):
        ImageDataset(str(root), use_labels=True)


# A labeled dataset missing one image's label names that image.
def test_missing_label_names_the_file(tmp_path):
    root = _folder(tmp_path)
    _write_json(root, {"labels": [["img0.png", 1], ["img1.png", 0], ["sub/img3.png", 0]]})
    with pytest.raises(DatasetError, match=r"sub/img2\.png.*no label"):
        ImageDataset(str(root), use_labels=True)


# Above the validation threshold, bad files are reported when loaded, with the same messages.
def test_large_datasets_are_checked_on_load(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    _png(str(root / "sub/zbig.png"), size=(16, 16))
    monkeypatch.setattr(dataset_mod, "VALIDATE_MAX_FILES", 1)
    ds = ImageDataset(str(root))  # Not validated up front: construction succeeds.
    assert len(ds) == 5
    ds[0]
    with pytest.raises(DatasetError, match=r"zbig\.png.*16x16.*8x8"):
        ds[4]
    with pytest.raises(DatasetError, match=r"zbig\.png"):
        ds.validate()
    # Unvalidated, the first image fixes the channel count: a later color image is an error naming it.
    gray = tmp_path / "gray"
    _png(str(gray / "a.png"), mode="L")
    _png(str(gray / "b.png"), mode="RGB")
    ds = ImageDataset(str(gray))
    assert ds.num_channels == 1 and ds[0][0].shape == (1, 8, 8)
    with pytest.raises(DatasetError, match=r"b\.png.*color.*grayscale"):
        ds[1]


# SyntheticDataset: image i depends only on seed and resolution; labels, xflip, sizes.
def test_synthetic_is_deterministic_and_labeled():
    a = SyntheticDataset(resolution=16, num_images=12, seed=3)
    b = SyntheticDataset(resolution=16, num_images=50, seed=3, use_labels=True, xflip=True, max_size=20)
    c = SyntheticDataset(resolution=16, num_images=12, seed=4)
    assert a[5][0].shape == (3, 16, 16) and a[5][0].dtype == np.uint8
    assert a[5][0].tobytes() == b[5][0].tobytes()
    assert a[5][0].tobytes() != c[5][0].tobytes()
    assert a.content_hash != c.content_hash and a.content_hash == SyntheticDataset(16, 12, seed=3).content_hash
    assert a.name == "synthetic" and a.label_dim == 0 and a[0][1].shape == (0,)
    assert len(b) == 40 and b.label_dim == 4 and b.has_labels
    np.testing.assert_array_equal(b[6][1], [0, 0, 1, 0])
    np.testing.assert_array_equal(b[26][0], b[6][0][:, :, ::-1])
    assert SyntheticDataset(resolution=8).image_shape == [3, 8, 8]
    with pytest.raises(ValueError, match="power of two"):
        SyntheticDataset(resolution=24)


# Synthetic images really show distinguishable shapes.
def test_synthetic_images_contain_shapes():
    ds = SyntheticDataset(resolution=32, num_images=200, seed=0)
    img = ds[0][0].astype(np.float64)
    assert img.std() > 20  # Not a constant image.
    # The shape fills the center, not the corners: the center differs from the background much more.
    means = [np.mean([ds[i][0] for i in range(k, 200, 4)], axis=0) for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).mean() > 3, (i, j)
    # Ring (class 3) has a hole: its center is darker than a disk's (class 0) on average.
    assert means[3][:, 14:18, 14:18].mean() < means[0][:, 14:18, 14:18].mean() - 30


# open_dataset picks the synthetic or the file dataset from its argument.
def test_open_dataset(tmp_path):
    assert open_dataset(None).resolution == 32
    ds = open_dataset("synthetic:16", use_labels=True, random_seed=5)
    assert isinstance(ds, SyntheticDataset) and ds.resolution == 16 and ds.label_dim == 4
    with pytest.raises(ValueError, match="synthetic:abc"):
        open_dataset("synthetic:abc")
    folder = open_dataset(str(_folder(tmp_path)), xflip=True)
    assert isinstance(folder, ImageDataset) and len(folder) == 8


# dataset_tool converts odd sizes/modes, labels from folders, skips broken files.
def test_dataset_tool_round_trip(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "dogs").mkdir()
    PIL.Image.new("RGB", (50, 37), (200, 30, 60)).save(src / "cats" / "a_solid.png")
    _png(str(src / "cats" / "b_gray.png"), size=(20, 33), mode="L")
    PIL.Image.new("RGBA", (40, 40), (0, 255, 0, 255)).save(src / "dogs" / "c_rgba.png")
    (src / "dogs" / "d_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    dest = tmp_path / "out" / "ds.zip"
    assert dataset_tool(["--source", str(src), "--dest", str(dest), "--resolution", "32",
                         "--labels", "from-folders"]) == 0
    out = capsys.readouterr()
    assert "d_broken.jpg" in out.err and "skipped 1" in out.out
    assert [p for p in os.listdir(dest.parent) if p != "ds.zip"] == []  # No temporary files left behind.
    with zipfile.ZipFile(dest) as zf:
        assert "00000/img00000000.png" in zf.namelist()
    ds = ImageDataset(str(dest), use_labels=True, resolution=32)
    assert len(ds) == 3 and ds.image_shape == [3, 32, 32] and ds.label_dim == 2
    assert [int(ds.get_label(i).argmax()) for i in range(3)] == [0, 0, 1]
    solid = ds[0][0].astype(int)
    assert np.abs(solid - np.array([200, 30, 60])[:, None, None]).max() <= 1
    assert np.abs(ds[2][0].astype(int) - np.array([0, 255, 0])[:, None, None]).max() <= 1


# dataset_tool's pad transform letterboxes; the synthetic dump matches SyntheticDataset.
def test_dataset_tool_pad_and_synthetic_dump(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    PIL.Image.new("RGB", (64, 32), (255, 255, 255)).save(src / "wide.png")
    dest = tmp_path / "padded"
    dataset_tool(["--source", str(src), "--dest", str(dest), "--resolution", "16", "--transform", "pad",
                  "--filter", "box"])
    img = ImageDataset(str(dest))[0][0]
    assert (img[:, 4:12] == 255).all() and (img[:, :4] == 0).all() and (img[:, 12:] == 0).all()
    syn = tmp_path / "syn.zip"
    dataset_tool(["--source", "synthetic:16", "--dest", str(syn), "--max-images", "8"])
    ds = ImageDataset(str(syn), use_labels=True)
    ref = SyntheticDataset(resolution=16)
    assert len(ds) == 8 and ds.label_dim == 4
    np.testing.assert_array_equal(ds[5][0], ref[5][0])
    np.testing.assert_array_equal(ds[5][1], [0, 1, 0, 0])
