"""Per-pixel maps beside the images (dataset.io.read_pixel_map): how each PNG mode is read,
and one clear error for a missing, mis-sized or unreadable map."""
import numpy as np
import pytest
from PIL import Image

from dataset import CorruptFileError, DatasetLayoutError
from dataset.io import pixel_map_path, read_pixel_map
from dataset.synthetic import generate
from utils.errors import UserError

VALUES = np.array([[0, 1, 47], [128, 200, 255]], dtype=np.uint8)


def save(root, folder, name, img):
    (root / folder).mkdir(exist_ok=True)
    img.save(root / folder / f"{name}.png")


def test_the_map_lives_beside_the_images(tmp_path):
    assert pixel_map_path(str(tmp_path), "saliency_map", "2007_000032") == str(
        tmp_path / "saliency_map" / "2007_000032.png")


def test_grey_and_palette_maps_are_read_as_stored(tmp_path):
    save(tmp_path, "m", "grey", Image.fromarray(VALUES))
    palette = Image.fromarray(VALUES).convert("P")
    palette.putpalette([255 - i % 256 for i in range(768)])   # colours unlike the indices
    save(tmp_path, "m", "palette", palette)
    for name in ("grey", "palette"):
        got = read_pixel_map(str(tmp_path), "m", name)
        assert got.dtype == np.uint8 and got.tolist() == VALUES.tolist(), name


def test_binary_and_colour_maps_become_grey_levels(tmp_path):
    save(tmp_path, "m", "binary", Image.fromarray(VALUES > 100))
    save(tmp_path, "m", "rgb", Image.fromarray(np.repeat(VALUES[:, :, None], 3, axis=2)))
    assert read_pixel_map(str(tmp_path), "m", "binary").tolist() == [[0, 0, 0],
                                                                     [255, 255, 255]]
    assert read_pixel_map(str(tmp_path), "m", "rgb").tolist() == VALUES.tolist()


def test_a_missing_saliency_map_says_how_to_get_the_maps(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        read_pixel_map(str(tmp_path), "saliency_map", "2007_000032")
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert str(tmp_path / "saliency_map" / "2007_000032.png") in msg and "missing" in msg
    assert "data/download_voc.sh" in msg and "WITH_SALIENCY=1" in msg


def test_a_missing_map_of_another_folder_names_its_folder(tmp_path):
    save(tmp_path, "depth", "a", Image.fromarray(VALUES))
    with pytest.raises(DatasetLayoutError, match=r"depth/b\.png is missing.*PNG of its name "
                                                 r"in depth/"):
        read_pixel_map(str(tmp_path), "depth", "b")


def test_the_map_must_have_the_size_of_its_image(tmp_path):
    save(tmp_path, "m", "a", Image.fromarray(VALUES))
    assert read_pixel_map(str(tmp_path), "m", "a", size=(3, 2)).shape == (2, 3)
    with pytest.raises(DatasetLayoutError, match=r"a\.png is 3x2 pixels, its image 2x3"):
        read_pixel_map(str(tmp_path), "m", "a", size=(2, 3))


def test_unreadable_and_16_bit_maps_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CorruptFileError, match=r"cannot read map .*broken\.png"):
        read_pixel_map(str(tmp_path), "m", "broken")
    save(tmp_path, "m", "deep", Image.fromarray(VALUES.astype(np.uint16) * 256))
    with pytest.raises(CorruptFileError, match=r"deep\.png has I;16 pixels"):
        read_pixel_map(str(tmp_path), "m", "deep")


def test_the_synthetic_saliency_maps_fit_their_images(tmp_path):
    voc = generate("voc", str(tmp_path), n_train=3, n_val=2, size=24, seed=4)
    for line in open(f"{voc}/splits/train_aug.txt"):
        image = line.split()[0]
        name = image.rsplit("/", 1)[1][:-4]
        with Image.open(voc + image) as img:
            sal = read_pixel_map(voc, "saliency_map", name, size=img.size)
        assert sal.shape == (img.size[1], img.size[0]) and sal.max() > 0
