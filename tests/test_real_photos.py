"""The real-photo data set: crops of scikit-image's bundled photographs, deterministic, in MVTec layout."""

import hashlib

import cv2
import numpy as np
import pytest

pytest.importorskip("skimage", reason="the real-photo data set needs scikit-image (the bench extra)")

from patchline.export.real_photos import DEFECTS, DEFAULT_PHOTOS, RESERVED, generate_real, load_photo, resolve_photos
from patchline.runtime.cli import main
from patchline.runtime.preprocess import list_images


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_layout_masks_and_photographs(real_photo_data):
    assert len(list_images(real_photo_data / "train" / "good")) == len(DEFAULT_PHOTOS)
    assert len(list_images(real_photo_data / "test" / "good")) == 4
    for defect in DEFECTS:
        images = list_images(real_photo_data / "test" / defect)
        assert len(images) == 2
        for image in images:
            mask = cv2.imread(str(real_photo_data / "ground_truth" / defect / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
            assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 255}
            assert 0.002 < (mask > 0).mean() < 0.1  # a visible defect, not the whole crop
    # Every photograph appears: the training crops take them in turn, so crop i comes from photograph i.
    for i, name in enumerate(DEFAULT_PHOTOS):
        crop = cv2.imread(str(real_photo_data / "train" / "good" / f"{i:03d}.png"))
        photo = load_photo(name)
        # Mean colour of a crop (half to three quarters of the photograph, lighting ±8 %) stays near the photograph's.
        assert np.abs(crop[..., ::-1].reshape(-1, 3).mean(0) - photo.reshape(-1, 3).mean(0)).max() < 60, name


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    photos = ["coins", "moon", "astronaut"]
    first = digest(generate_real(tmp_path / "a", photos, train=3, test_good=1, per_defect=1, size=64, seed=5))
    again = digest(generate_real(tmp_path / "b", photos, train=3, test_good=1, per_defect=1, size=64, seed=5))
    other = digest(generate_real(tmp_path / "c", photos, train=3, test_good=1, per_defect=1, size=64, seed=6))
    assert first == again and len(first) == 3 + 1 + 2 * len(DEFECTS)
    assert all(first[name] != other[name] for name in first if "ground_truth" not in name)


@pytest.mark.parametrize("name", RESERVED)
def test_the_independent_check_photographs_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match=f"photograph '{name}' is reserved for an independent check"):
        generate_real(tmp_path / "x", ["coins", name], train=1)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_unknown_photograph_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown photograph 'lena'; choose from .*coins.*ihc"):
        resolve_photos(["lena"])
    assert resolve_photos(["ihc", "motorcycle_left"]) == ["immunohistochemistry", "motorcycle_left"]


def test_sample_data_real_from_the_cli(tmp_path, capsys):
    main(["sample-data", str(tmp_path / "data"), "--real", "--photos", "text,retina", "--train", "2", "--test-good", "1",
          "--per-defect", "1", "--size", "96"])
    assert "sample data written" in capsys.readouterr().out
    assert len(list_images(tmp_path / "data" / "train")) == 2 and len(list_images(tmp_path / "data" / "test")) == 1 + len(DEFECTS)
    with pytest.raises(SystemExit, match="'gravel' is reserved"):
        main(["sample-data", str(tmp_path / "other"), "--real", "--photos", "gravel"])
