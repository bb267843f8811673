"""Folders of aligned faces as verification sets: pair enumeration and sampling, LFW pairs.txt,
the folder scored as its `.bin` is, the `.bin` InsightFace's load_bin reads, each bad input."""
from __future__ import annotations

import builtins
import errno
import importlib.util
import io
import itertools
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fr_distill.eval import EvalDataError
from fr_distill.eval.folder import (folder_pair_set, generated_pairs, genuine_pairs, interleave,
                                    list_identities, read_pairs_file, sample_impostor_pairs)
from fr_distill.eval.verification import read_bin
from launch import eval as launch_eval
from tests.conftest import (REPO, fifos, forbid_decoding, lying_jpeg, lying_png,
                            write_jpeg_folder)
from tests.eval_data import face_images, tiny_model

_spec = importlib.util.spec_from_file_location("folder2bin", REPO / "tools" / "folder2bin.py")
folder2bin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(folder2bin)


def uneven_folder(root):
    """Identities id000: 4 images, id001: 1 image, id002: 3 images (JPEGs 0.jpg, 1.jpg, …)."""
    write_jpeg_folder(root, 3, 4)
    for name in ("id001/1.jpg", "id001/2.jpg", "id001/3.jpg", "id002/3.jpg"):
        (root / name).unlink()
    return root


def insightface_load_bin(path):
    """InsightFace's ``load_bin``: plain unpickling, then ``encoding='bytes'``; each image decoded."""
    try:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f)
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            bins, issame_list = pickle.load(f, encoding="bytes")
    images = [np.asarray(Image.open(io.BytesIO(bins[i])).convert("RGB"))
              for i in range(len(issame_list) * 2)]
    return bins, issame_list, images


def test_genuine_pairs_are_every_pair_within_each_identity(tmp_path, caplog):
    identities = list_identities(uneven_folder(tmp_path / "f"))
    assert identities == {"id000": [f"id000/{k}.jpg" for k in range(4)], "id001": ["id001/0.jpg"],
                          "id002": [f"id002/{k}.jpg" for k in range(3)]}
    genuine = genuine_pairs(identities)
    assert len(genuine) == 4 * 3 // 2 + 0 + 3 * 2 // 2  # sum n_i (n_i - 1) / 2 = 9
    assert genuine[:3] == [("id000/0.jpg", "id000/1.jpg", True), ("id000/0.jpg", "id000/2.jpg", True),
                           ("id000/0.jpg", "id000/3.jpg", True)]
    assert genuine[6:] == [("id002/0.jpg", "id002/1.jpg", True), ("id002/0.jpg", "id002/2.jpg", True),
                           ("id002/1.jpg", "id002/2.jpg", True)]
    with caplog.at_level(logging.WARNING, logger="fr_distill"):
        pairs = generated_pairs(tmp_path / "f", seed=3)
    assert "1 of 3 identities hold one image (e.g. id001)" in caplog.text
    assert [p for p in pairs if p[2]] == genuine
    assert pairs[0::2] == genuine and not any(p[2] for p in pairs[1::2])  # 9 and 9 alternate


def test_impostor_sampling_is_seeded_distinct_and_never_one_identity(tmp_path):
    identities = list_identities(uneven_folder(tmp_path / "f"))
    owner = {f: name for name, files in identities.items() for f in files}
    every = {(a, b) for a, b in itertools.combinations(sorted(owner), 2) if owner[a] != owner[b]}
    assert len(every) == 4 * 1 + 4 * 3 + 1 * 3  # 19 impostor pairs in all
    sample = sample_impostor_pairs(identities, 9, seed=5)
    assert sample == sample_impostor_pairs(identities, 9, seed=5)
    assert sample != sample_impostor_pairs(identities, 9, seed=6)
    assert len({(a, b) for a, b, _ in sample}) == 9
    assert all(not same and (a, b) in every for a, b, same in sample)
    assert {(a, b) for a, b, _ in sample_impostor_pairs(identities, 19, seed=0)} == every
    with pytest.raises(EvalDataError, match="20 impostor pairs asked for, but the folder's "
                                            "identities form only 19"):
        sample_impostor_pairs(identities, 20, seed=0)
    pairs = generated_pairs(tmp_path / "f", impostors=4, seed=5)
    assert [p[2] for p in pairs] == [True, False, True, True, False, True, True, True, False,
                                     True, True, False, True]  # 9 genuine, 4 impostor, interleaved


def test_interleave_spreads_both_kinds_evenly():
    assert interleave(["g0", "g1"], ["i0", "i1", "i2", "i3"]) == ["i0", "g0", "i1", "i2", "g1", "i3"]


def lfw_folder(root):
    """LFW's layout: name/name_0001.jpg …, for Ann_Lee (3 images) and Bob (2)."""
    faces = iter(face_images(5, 112, seed=4))
    for name, count in (("Ann_Lee", 3), ("Bob", 2)):
        (root / name).mkdir(parents=True)
        for index in range(1, count + 1):
            Image.fromarray(next(faces)).save(root / name / f"{name}_{index:04d}.jpg", quality=95)
    return root


def test_pairs_file_both_line_kinds_and_headers(tmp_path):
    root = lfw_folder(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text("2\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBob\t1\n"
                                        "Bob\t1\t2\nBob\t2\tAnn_Lee\t3\n")
    expected = [("Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", True),
                ("Ann_Lee/Ann_Lee_0001.jpg", "Bob/Bob_0001.jpg", False),
                ("Bob/Bob_0001.jpg", "Bob/Bob_0002.jpg", True),
                ("Bob/Bob_0002.jpg", "Ann_Lee/Ann_Lee_0003.jpg", False)]
    assert read_pairs_file(tmp_path / "pairs.txt", root) == expected
    (tmp_path / "count.txt").write_text("2\nAnn_Lee 1 2\nBob 1 2\nAnn_Lee 1 Bob 1\nBob 2 Ann_Lee 3\n\n")
    assert read_pairs_file(tmp_path / "count.txt", root) == [expected[i] for i in (0, 2, 1, 3)]


def test_folder_scores_as_its_bin_and_insightface_reads_the_bin(tmp_path, capsys):
    folder = write_jpeg_folder(tmp_path / "faces", 5, 4, seed=1)
    out_bin = tmp_path / "written.bin"
    assert folder2bin.main([str(folder), str(out_bin), "--seed", "2"]) == 0
    assert "wrote 60 pairs (30 genuine, 30 impostor)" in capsys.readouterr().out
    pairs = generated_pairs(folder, seed=2)
    bins, issame, images = insightface_load_bin(out_bin)
    assert issame == [same for *_, same in pairs] and all(type(v) is bool for v in issame)
    assert all(type(b) is bytes for b in bins) and len(bins) == 120
    files = [f for a, b, _ in pairs for f in (a, b)]
    for image, file in zip(images, files, strict=True):
        assert np.array_equal(image, np.asarray(Image.open(folder / file).convert("RGB")))
    assert folder2bin.main([str(folder), str(out_bin)]) == 2
    assert f"{out_bin} already exists; remove it or pass --force to overwrite" \
        in capsys.readouterr().err

    torch.jit.script(tiny_model()).save(str(tmp_path / "model.pt"))
    assert launch_eval.main(["--model", str(tmp_path / "model.pt"), "--folder", str(folder),
                             "--pair-seed", "2", "--bin", str(out_bin), "--out",
                             str(tmp_path / "out"), "--batch-size", "16"]) == 0
    assert "faces" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())["bin"]
    assert results["faces"] == results["written"]  # the same numbers, bit for bit
    assert 0.0 < results["faces"]["auc"] < 1.0


def test_pairs_file_folder_equals_its_bin(tmp_path):
    root = lfw_folder(tmp_path / "lfw")
    lines = ["Ann_Lee 1 2", "Ann_Lee 1 3", "Ann_Lee 2 3", "Bob 1 2", "Ann_Lee 3 1", "Bob 2 1"]
    mismatched = ["Ann_Lee 1 Bob 1", "Ann_Lee 2 Bob 2", "Bob 1 Ann_Lee 3", "Bob 2 Ann_Lee 1",
                  "Ann_Lee 3 Bob 1", "Bob 1 Ann_Lee 2"]
    (tmp_path / "pairs.txt").write_text("2 3\n" + "\n".join(lines[:3] + mismatched[:3] + lines[3:]
                                                            + mismatched[3:]) + "\n")
    assert folder2bin.main([str(root), str(tmp_path / "lfw.bin"), "--pairs",
                            str(tmp_path / "pairs.txt")]) == 0
    pair_set = folder_pair_set(root, tmp_path / "pairs.txt")
    bins, issame, _ = insightface_load_bin(tmp_path / "lfw.bin")
    assert bins == pair_set.payloads and issame == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    assert bins[0] == (root / "Ann_Lee/Ann_Lee_0001.jpg").read_bytes()
    assert bins[11] == (root / "Ann_Lee/Ann_Lee_0003.jpg").read_bytes()  # pair 5: Bob 1 Ann_Lee 3


def error_of(call) -> str:
    with pytest.raises(EvalDataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_folders_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    assert error_of(lambda: folder_pair_set(tmp_path / "empty")) == (
        f"{tmp_path / 'empty'}: empty folder, expected one sub-folder of aligned face images "
        f"per identity")
    folder = write_jpeg_folder(tmp_path / "f", 4, 3)
    Image.fromarray(face_images(1, 250, 0)[0]).save(folder / "id002" / "1.jpg")
    assert error_of(lambda: folder_pair_set(folder)) == (
        f"{folder / 'id002' / '1.jpg'}: image is 250x250, expected an aligned 112x112 face "
        f"(align loose images with tools/align_faces.py)")
    (folder / "id002" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert error_of(lambda: folder_pair_set(folder)).startswith(
        f"{folder / 'id002' / '1.jpg'}: image cannot be decoded (")
    (folder / "id002" / "1.jpg").unlink()
    (folder / "id002" / "1.jpg").symlink_to(tmp_path / "gone.jpg")
    assert error_of(lambda: folder_pair_set(folder)) == \
        f"{folder / 'id002' / '1.jpg'}: cannot read image (No such file or directory)"
    (folder / "id002" / "1.jpg").unlink()
    (folder / "notes.txt").write_text("x")
    assert error_of(lambda: folder_pair_set(folder)).startswith(
        f"{folder / 'notes.txt'}: file outside any identity folder")
    (folder / "notes.txt").unlink()
    (folder / "id004").mkdir()
    assert error_of(lambda: folder_pair_set(folder)) == \
        f"{folder / 'id004'}: identity folder holds no images"
    singles = write_jpeg_folder(tmp_path / "singles", 3, 1)
    assert error_of(lambda: folder_pair_set(singles)) == \
        f"{singles}: no identity holds two images, so there is no genuine pair"
    small = write_jpeg_folder(tmp_path / "small", 2, 2)
    assert error_of(lambda: folder_pair_set(small)) == \
        f"{small}: 4 pairs, the 10-fold protocol needs at least 10"


@pytest.mark.parametrize("text, message", [
    ("2 1\nAnn_Lee 1 2\nAnn_Lee 1 Bob\nBob 1 2\nBob 2 Ann_Lee 3\n",
     "pairs.txt:3: expected 'name i j' (matched) or 'name1 i name2 j' (mismatched), "
     "got 'Ann_Lee 1 Bob'"),
    ("2 1\nAnn_Lee 1 2\nAnn_Lee 1 Bob 1\n\nBob 1 4\nBob 2 Ann_Lee 3\n",
     "pairs.txt:5: image {root}/Bob/Bob_0004.jpg does not exist"),
    ("ten\n", "pairs.txt:1: header must be 'N_folds N_per_fold' or a count N, got 'ten'"),
    ("3\nAnn_Lee 1 2\nAnn_Lee 1 Bob 1\n",
     "pairs.txt: the header announces 3 matched and 3 mismatched pairs, the file lists 1 and 1"),
])
def test_bad_pairs_files_name_the_line(tmp_path, text, message):
    root = lfw_folder(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text(text)
    found = error_of(lambda: read_pairs_file(tmp_path / "pairs.txt", root))
    assert found == f"{tmp_path}/" + message.format(root=root)


def test_special_files_and_huge_images_are_refused_by_name_before_reading(tmp_path, monkeypatch,
                                                                         capsys):
    """Before, a FIFO among the faces, given as ``--pairs`` or as ``--bin`` hung the command; a
    link to a device was read (``/dev/zero`` until memory ran out; ``/dev/null`` here); a
    632-byte JPEG declaring 30000x30000 pixels was decoded in full (2.7 GB) before its size
    was checked. Each is now refused from its ``stat`` or its header (decoding is a tripwire)."""
    folder = write_jpeg_folder(tmp_path / "faces", 4, 3)
    fifo, device = folder / "id001" / "1.jpg", folder / "id002" / "1.jpg"
    fifo.unlink()
    device.unlink()
    device.symlink_to(os.devnull)
    pairs, bin_fifo = tmp_path / "pairs.txt", tmp_path / "lfw.bin"
    with fifos(fifo, pairs, bin_fifo):
        assert error_of(lambda: folder_pair_set(folder)) == \
            f"{fifo}: cannot read image (a FIFO, not a regular file)"
        assert folder2bin.main([str(folder), str(tmp_path / "out.bin")]) == 2
        assert capsys.readouterr().err == \
            f"error: {fifo}: cannot read image (a FIFO, not a regular file)\n"
        assert error_of(lambda: read_pairs_file(pairs, folder)) == \
            f"{pairs}: cannot read the pairs list (a FIFO, not a regular file)"
        assert error_of(lambda: read_bin(str(bin_fifo))) == \
            f"{bin_fifo}: cannot read (a FIFO, not a regular file)"
    write_jpeg_folder(tmp_path / "one", 1, 1)
    shutil.copy(tmp_path / "one" / "id000" / "0.jpg", fifo)
    assert error_of(lambda: folder_pair_set(folder)) == \
        f"{device}: cannot read image (a character device, not a regular file)"
    forbid_decoding(monkeypatch)
    first = folder / "id000" / "0.jpg"  # the first image read
    for data, declared in ((lying_jpeg(30000, 30000), "30000x30000"),
                           (lying_png(5000, 5000), "5000x5000")):
        first.write_bytes(data)
        assert error_of(lambda: folder_pair_set(folder)) == (
            f"{first}: image cannot be decoded (its header declares {declared} pixels, more "
            f"than 4096x4096; refused before decoding)")


def test_a_pairs_list_cannot_reach_outside_the_folder(tmp_path):
    """Before, ``../`` in a name of pairs.txt read (and folder2bin copied into its `.bin`) any
    image the user could read outside ``--folder``."""
    root = lfw_folder(tmp_path / "lfw")
    (tmp_path / "secret").mkdir()
    shutil.copy(root / "Bob" / "Bob_0001.jpg", tmp_path / "secret_0001.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\nAnn_Lee 1 2\n\nAnn_Lee 1 ../secret 1\n")
    assert (root / "../secret/../secret_0001.jpg").is_file()  # reachable, were it allowed
    assert error_of(lambda: read_pairs_file(pairs, root)) == (
        f"{pairs}:4: image ../secret/../secret_0001.jpg is outside {root} (a pairs list names "
        f"images inside the folder)")
    pairs.write_text(f"1\nAnn_Lee 1 2\nAnn_Lee 1 {tmp_path}/secret 1\n")
    assert error_of(lambda: read_pairs_file(pairs, root)).startswith(
        f"{pairs}:3: image {tmp_path}/secret/")


def read_only_file_system(monkeypatch, directory) -> None:
    """What Linux answers under a read-only mount at ``directory``: creating or writing a file,
    and removing or renaming one (even one that does not exist), fail with EROFS."""
    def refused(path):
        return os.fspath(path).startswith(str(directory))

    def erofs(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open = builtins.open, os.open
    real_unlink, real_replace = os.unlink, os.replace
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and refused(file) and set(mode) & set("wax+"):
            erofs(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & writes:
            erofs(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_unlink(path, *args, **kwargs):
        return erofs(path) if refused(path) else real_unlink(path, *args, **kwargs)

    def guarded_replace(src, dst, *args, **kwargs):
        return erofs(dst) if refused(dst) else real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "unlink", guarded_unlink)
    monkeypatch.setattr(os, "replace", guarded_replace)


def test_folder2bin_to_a_place_it_cannot_write_is_one_line_before_reading(tmp_path, monkeypatch,
                                                                         capsys):
    """Before, a read-only file system gave an OSError traceback (removing the temporary file
    that could not be created fails there too), as did a file name too long for the file
    system (from ``exists()``); a missing directory was named only after every image was read."""
    folder = write_jpeg_folder(tmp_path / "faces", 4, 3)
    read_only = tmp_path / "mnt"
    read_only.mkdir()
    read_only_file_system(monkeypatch, read_only)
    cases = [(read_only / "faces.bin", "Read-only file system"),
             (tmp_path / ("x" * 300 + ".bin"), "File name too long"),
             (tmp_path / "missing" / "faces.bin", "No such file or directory")]
    with monkeypatch.context() as patch:
        patch.setattr(folder2bin, "folder_pair_set",
                      lambda *args: pytest.fail("the folder was read before the output was checked"))
        for target, reason in cases:
            assert folder2bin.main([str(folder), str(target)]) == 2
            assert capsys.readouterr().err == \
                f"error: output .bin: cannot write {target} ({reason})\n"
    assert list(read_only.iterdir()) == [] and not (tmp_path / "missing").exists()
    assert folder2bin.main([str(folder), str(tmp_path / "faces.bin")]) == 0  # the same, writable


def test_evaluation_command_refuses_bad_folder_input_before_the_model_loads(tmp_path, capsys):
    folder = write_jpeg_folder(tmp_path / "faces", 4, 3)
    argv = ["--model", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "out")]
    assert launch_eval.main([*argv, "--folder", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: not a folder of identity sub-folders" in capsys.readouterr().err
    write_jpeg_folder(tmp_path / "other" / "faces", 4, 3)
    assert launch_eval.main([*argv, "--folder", str(folder), str(tmp_path / "other" / "faces")]) == 2
    assert "same set name 'faces'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        launch_eval.main([*argv, "--folder", str(folder), "--pairs", "a.txt", "b.txt"])
    assert exit_info.value.code == 2 and "1 --folder but 2 --pairs" in capsys.readouterr().err
