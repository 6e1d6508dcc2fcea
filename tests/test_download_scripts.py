"""The download scripts, run on local fake archives shaped like the real ones (nothing is
downloaded: every source is a local file)."""
import os
import shutil
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from dataset.ade import AdeSegmentation
from dataset.io import read_pixel_map
from dataset.synthetic import generate
from dataset.voc import VOCSegmentation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def zip_folder(archive, folder, arcname, extra=()):
    with zipfile.ZipFile(archive, "w") as z:
        for path, _, files in os.walk(folder):
            for f in files:
                full = os.path.join(path, f)
                z.write(full, os.path.join(arcname, os.path.relpath(full, folder)))
        for name, data in extra:
            z.writestr(name, data)


@pytest.fixture(scope="module")
def voc_archives(tmp_path_factory):
    """VOCtrainval tar, SegmentationClassAug(.zip), its visualisation, list.zip, and the
    saliency maps as a zip holding saliency_map/ (after a macOS resource folder of the same
    name) and as a tar.gz holding the PNG files alone."""
    work = tmp_path_factory.mktemp("voc_archives")
    src = generate("voc", str(work / "src"), n_train=6, n_val=3, size=24, seed=0)
    with tarfile.open(work / "voc.tar", "w") as t:
        t.add(os.path.join(src, "JPEGImages"), "VOCdevkit/VOC2012/JPEGImages")
        t.add(os.path.join(src, "SegmentationClassAug"), "VOCdevkit/VOC2012/SegmentationClass")
    zip_folder(work / "aug.zip", os.path.join(src, "SegmentationClassAug"),
               "SegmentationClassAug", extra=[("__MACOSX/._x", b"junk")])
    zip_folder(work / "vis.zip", os.path.join(src, "SegmentationClassAug"),
               "SegmentationClassAug_Visualization")
    zip_folder(work / "list.zip", os.path.join(src, "splits"), "list")
    maps = os.path.join(src, "saliency_map")
    zip_folder(work / "saliency.zip", maps, "saliency_map",
               extra=[("__MACOSX/saliency_map/._2007_000000.png", b"junk")])
    with tarfile.open(work / "saliency.tar.gz", "w:gz") as t:
        for name in sorted(os.listdir(maps)):
            t.add(os.path.join(maps, name), name)
    zip_folder(work / "saliency_incomplete.zip", maps, "saliency_map")
    with zipfile.ZipFile(work / "saliency_incomplete.zip") as z:
        kept = [(n, z.read(n)) for n in z.namelist() if not n.endswith("2007_000004.png")]
    with zipfile.ZipFile(work / "saliency_incomplete.zip", "w") as z:
        for n, data in kept:
            z.writestr(n, data)
    return work


def run_script(name, data_root, env):
    return subprocess.run(["bash", os.path.join(ROOT, "data", name), str(data_root)],
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=120)


def voc_env(work):
    return {"VOC_URL": f"file://{work}/voc.tar", "VOC_AUG_URL": f"{work}/aug.zip",
            "VOC_AUG_VIS_URL": f"{work}/vis.zip", "VOC_LIST_URL": f"file://{work}/list.zip"}


def test_voc_script_lays_out_what_the_reader_expects(voc_archives, tmp_path):
    out = run_script("download_voc.sh", tmp_path / "data", voc_env(voc_archives))
    assert out.returncode == 0, out.stderr
    voc = tmp_path / "data" / "PascalVOC12"
    assert len(VOCSegmentation(str(tmp_path / "data"), "train").images) == 6
    assert len(VOCSegmentation(str(tmp_path / "data"), "val").images) == 3
    assert (voc / "SegmentationClassAug_Visualization").is_dir()
    assert (voc / "SegmentationClass").is_dir()
    assert not (voc / "saliency_map").exists()           # the saliency step is optional
    assert not (tmp_path / "data" / "downloads").exists()
    assert not list((tmp_path / "data").glob(".unpack*"))
    assert "official list has 10582" in out.stderr      # a count warning, not an error
    # a second run fetches nothing: sources that no longer exist do not matter
    gone = {k: "/nonexistent/archive" for k in voc_env(voc_archives)}
    again = run_script("download_voc.sh", tmp_path / "data", gone)
    assert again.returncode == 0, again.stderr


def test_voc_script_resumes_a_partial_layout(voc_archives, tmp_path):
    assert run_script("download_voc.sh", tmp_path, voc_env(voc_archives)).returncode == 0
    shutil.rmtree(tmp_path / "PascalVOC12" / "splits")
    env = dict(voc_env(voc_archives), VOC_URL="/nonexistent/voc.tar")
    out = run_script("download_voc.sh", tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "PascalVOC12" / "splits" / "train_aug.txt").exists()


def test_voc_script_fails_loudly(voc_archives, tmp_path):
    env = dict(voc_env(voc_archives), VOC_AUG_URL=f"file://{voc_archives}/missing.zip")
    out = run_script("download_voc.sh", tmp_path, env)
    assert out.returncode != 0
    assert "error: cannot download" in out.stderr and "missing.zip" in out.stderr
    assert "set VOC_AUG_URL" in out.stderr
    assert not (tmp_path / "PascalVOC12" / "SegmentationClassAug").exists()


def test_voc_script_reports_a_listed_file_that_is_missing(voc_archives, tmp_path):
    assert run_script("download_voc.sh", tmp_path, voc_env(voc_archives)).returncode == 0
    os.remove(tmp_path / "PascalVOC12" / "JPEGImages" / "2008_000001.jpg")
    out = run_script("download_voc.sh", tmp_path, voc_env(voc_archives))
    assert out.returncode != 0 and "2008_000001.jpg" in out.stderr


def training_ids(voc):
    return [line.split()[0][len("/JPEGImages/"):-4]
            for line in (voc / "splits" / "train_aug.txt").read_text().splitlines()]


def test_voc_script_saliency_step_installs_the_maps(voc_archives, tmp_path):
    env = dict(voc_env(voc_archives), SALIENCY_URL=f"file://{voc_archives}/saliency.zip")
    out = run_script("download_voc.sh", tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert "a saliency map for each of the 6 training images" in out.stdout
    voc = tmp_path / "PascalVOC12"
    source = voc_archives / "src" / "PascalVOC12" / "saliency_map"
    for name in training_ids(voc):
        with Image.open(voc / "JPEGImages" / f"{name}.jpg") as img:
            got = read_pixel_map(str(voc), "saliency_map", name, size=img.size)
        assert np.array_equal(got, np.asarray(Image.open(source / f"{name}.png")))
    assert not (voc / "saliency_map" / "._2007_000000.png").exists()
    assert not (tmp_path / "downloads").exists() and not list(tmp_path.glob(".unpack*"))
    # installed maps are kept: a second run needs no source
    again = run_script("download_voc.sh", tmp_path, {k: "/nonexistent/archive.zip"
                                                     for k in env})
    assert again.returncode == 0, again.stderr
    assert "have " + str(voc / "saliency_map") in again.stdout


def test_voc_script_adds_maps_from_a_tar_of_png_files_later(voc_archives, tmp_path):
    assert run_script("download_voc.sh", tmp_path, voc_env(voc_archives)).returncode == 0
    gone = {k: "/nonexistent/archive" for k in voc_env(voc_archives)}
    env = dict(gone, WITH_SALIENCY="1", SALIENCY_URL=str(voc_archives / "saliency.tar.gz"))
    out = run_script("download_voc.sh", tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "PascalVOC12" / "saliency_map")) == sorted(
        os.listdir(voc_archives / "src" / "PascalVOC12" / "saliency_map"))


def test_voc_script_saliency_step_without_an_address_says_where_to_get_the_maps(tmp_path):
    out = run_script("download_voc.sh", tmp_path, {"WITH_SALIENCY": "1",
                                                   "VOC_URL": "/nonexistent/voc.tar"})
    assert out.returncode != 0 and out.stderr.count("\n") == 1
    assert "needs SALIENCY_URL" in out.stderr and "clovaai/SSUL" in out.stderr
    assert str(tmp_path / "PascalVOC12" / "saliency_map" / "<id>.png") in out.stderr
    assert not (tmp_path / "PascalVOC12").exists() and not (tmp_path / "downloads").exists()


def test_voc_script_rejects_an_incomplete_saliency_archive(voc_archives, tmp_path):
    env = dict(voc_env(voc_archives),
               SALIENCY_URL=str(voc_archives / "saliency_incomplete.zip"))
    out = run_script("download_voc.sh", tmp_path, env)
    assert out.returncode != 0
    assert "1 of 6 training images have no saliency map" in out.stderr
    assert "saliency_map/2007_000004.png is missing" in out.stderr


def test_ade_script(tmp_path):
    src = generate("ade", str(tmp_path / "src"), n_train=4, n_val=2, size=24, seed=0)
    zip_folder(tmp_path / "ade.zip", src, "ADEChallengeData2016")
    env = {"ADE_URL": f"file://{tmp_path}/ade.zip"}
    out = run_script("download_ade.sh", tmp_path / "data", env)
    assert out.returncode == 0, out.stderr
    assert len(AdeSegmentation(str(tmp_path / "data"), train=True).images) == 4
    assert len(AdeSegmentation(str(tmp_path / "data"), train=False).images) == 2
    assert not (tmp_path / "data" / "downloads").exists()
    again = run_script("download_ade.sh", tmp_path / "data", {"ADE_URL": "/nonexistent"})
    assert again.returncode == 0, again.stderr
    os.remove(tmp_path / "data/ADEChallengeData2016/annotations/validation/"
                         "ADE_val_00000002.png")
    broken = run_script("download_ade.sh", tmp_path / "data", env)
    assert broken.returncode != 0 and "ADE_val_00000002.png" in broken.stderr
