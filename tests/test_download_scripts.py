"""The download scripts, run on local fake archives shaped like the real ones."""
import os
import shutil
import subprocess
import tarfile
import zipfile

import pytest

from dataset.ade import AdeSegmentation
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
    """VOCtrainval tar, SegmentationClassAug(.zip), its visualisation and list.zip."""
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
