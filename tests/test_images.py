import cv2
import numpy as np
import pytest

from patchline.runtime.image_header import DEFAULT_MAX_PIXELS, HeaderError, image_size
from patchline.runtime.preprocess import (
    ImageError,
    Preprocessor,
    decode_image,
    evaluation_root,
    iter_images,
    list_images,
    read_image,
    training_root,
)
from tests.hostile import bomb_png, corpus, encode, lying, lying_png, tiff


@pytest.fixture()
def odd_folder(tmp_path):
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    folder = tmp_path / "good"
    (folder / "sub").mkdir(parents=True)
    cv2.imwrite(str(folder / "ok.png"), bgr)
    cv2.imwrite(str(folder / "sub" / "gray.png"), bgr[..., 0])
    cv2.imwrite(str(folder / "rgba.png"), np.dstack([bgr, np.full(bgr.shape[:2], 128, np.uint8)]))
    cv2.imwrite(str(folder / "deep.tif"), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / "photo.jpg"), bgr)
    (folder / "empty.png").write_bytes(b"")
    data = (folder / "photo.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    png = (folder / "ok.png").read_bytes()
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.txt").write_text("not an image, not listed")
    (folder / "._ok.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble metadata, not listed")
    return folder, bgr


def test_conversions_to_rgb8(odd_folder):
    folder, bgr = odd_folder
    rgb = bgr[..., ::-1]
    np.testing.assert_array_equal(read_image(folder / "ok.png"), rgb)
    gray = read_image(folder / "sub" / "gray.png")
    assert gray.shape == (40, 50, 3) and (gray[..., 0] == bgr[..., 0]).all()
    np.testing.assert_array_equal(read_image(folder / "rgba.png"), rgb)
    np.testing.assert_array_equal(read_image(folder / "deep.tif"), rgb)


@pytest.mark.parametrize("name,reason", [
    ("empty.png", "empty file"),
    ("cut.jpg", "truncated JPEG"),
    ("cut.png", "not a decodable image"),
    ("missing.png", "cannot read"),
])
def test_bad_files_name_path_and_reason(odd_folder, name, reason):
    folder, _ = odd_folder
    with pytest.raises(ImageError, match=reason) as err:
        read_image(folder / name)
    assert name in str(err.value)


@pytest.fixture()
def load_good_images():
    pytest.importorskip("torch")  # export's loader: the export extra is not in the runtime-only venv
    from patchline.export.fit import load_good_images

    return load_good_images


def test_export_loader_skips_and_reports(odd_folder, load_good_images):
    folder, _ = odd_folder
    images, skipped = load_good_images(folder)
    assert len(images) == 5  # ok, gray, rgba, 16-bit tif, jpg
    assert len(skipped) == 3
    assert any("empty.png: empty file" in s for s in skipped)
    assert any("cut.jpg" in s for s in skipped) and any("cut.png" in s for s in skipped)


def test_mvtec_category_uses_train_good(sample_data, load_good_images):
    images, skipped = load_good_images(sample_data)
    assert len(images) == 20 and not skipped


def test_listing_skips_dot_files_and_iteration_names_each_bad_file(odd_folder):
    folder, _ = odd_folder
    paths = list_images(folder)
    assert [p.name for p in paths] == ["cut.jpg", "cut.png", "deep.tif", "empty.png", "ok.png", "photo.jpg", "rgba.png",
                                       "gray.png"]
    results = list(iter_images(paths))
    assert [path for path, _ in results] == paths
    errors = {path.name: item.reason for path, item in results if isinstance(item, ImageError)}
    assert errors == {"cut.jpg": "truncated JPEG (no end-of-image marker)", "empty.png": "empty file",
                      "cut.png": "not a decodable image (corrupt or truncated)"}
    assert all(item.dtype == np.uint8 and item.shape == (40, 50, 3) for _, item in results if not isinstance(item, ImageError))


def test_layout_roots(sample_data, odd_folder):
    assert training_root(sample_data) == sample_data / "train" / "good"
    assert evaluation_root(sample_data) == sample_data / "test"
    folder, _ = odd_folder
    assert training_root(folder) == folder and evaluation_root(folder) == folder


@pytest.mark.parametrize("resize", ["area", "bilinear", "antialias"])
def test_preprocessing_works_in_place_on_its_own_copy_only(resize):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 70, 3), np.uint8)
    before = image.copy()
    preprocess = Preprocessor((32, 32), resize, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    first, second = preprocess([image]), preprocess([image])
    np.testing.assert_array_equal(image, before)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32 and first.shape == (1, 3, 32, 32) and first.flags.c_contiguous


# -- hostile files: the size is read from the header and checked before anything is decoded -------------------


def _rgb() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 255, (37, 53, 3), np.uint8)


def test_headers_tell_the_true_size_of_real_files():
    rgb = _rgb()
    files = {"PNG": encode(rgb, ".png"), "JPEG": encode(rgb, ".jpg"), "BMP": encode(rgb, ".bmp"),
             "TIFF": encode(rgb, ".tiff"), "WebP": encode(rgb, ".webp"), "GIF": encode(rgb, ".gif"),
             "big-endian TIFF": tiff(53, 37, bytes(53 * 37), ">")}
    for name, data in files.items():
        assert image_size(data)[1:] == (53, 37), name
        assert decode_image(data, name).shape == (37, 53, 3), name
    with pytest.raises(HeaderError, match="PNG header cut short"):
        image_size(files["PNG"][:20])


@pytest.mark.parametrize("name", sorted(lying(_rgb())))
def test_a_lying_header_is_refused_before_decoding_with_its_size(name):
    data = lying(_rgb())[name]
    kind, width, height = image_size(data)
    with pytest.raises(ImageError, match=f"its {kind} header declares {width}x{height} pixels, more than the limit"):
        decode_image(data, name)
    assert width * height > DEFAULT_MAX_PIXELS


def test_the_pixel_limit_is_configurable_and_opencvs_own_refusal_is_an_image_error():
    bomb = bomb_png(12_000)  # real: 144 megapixels of zeros in ~150 kB
    with pytest.raises(ImageError, match="12000x12000 pixels, more than the limit of 100000000"):
        decode_image(bomb, "bomb.png")
    with pytest.raises(ImageError, match="12000x12000 pixels, more than the limit of 1000000 "):
        decode_image(bomb, "bomb.png", max_pixels=1_000_000)
    # Above our limit OpenCV 5 asserts (cv2.error: validateInputImageSize) instead of returning None.
    with pytest.raises(ImageError, match="the PNG decoder refused it: .*validateInputImageSize") as err:
        decode_image(lying_png(), "lying.png", max_pixels=10**12)
    assert err.value.path == "lying.png"


def test_every_hostile_file_is_decoded_or_refused_by_name():
    files, usable = corpus(_rgb())
    for name, data in files.items():
        try:
            image = decode_image(data, name)
        except ImageError as exc:
            assert name not in usable and exc.path == name and exc.reason, name
            continue
        assert name in usable and image.dtype == np.uint8 and image.shape == (37, 53, 3), name
