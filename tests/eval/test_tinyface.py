"""V4 TinyFace: CMC on a hand-computed table (ties, distractors above the mate), file-name
identities, the synthetic release through launch/eval.py, and every bad-input message."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from fr_distill.eval import EvalDataError
from fr_distill.eval.extract import extract_features
from fr_distill.eval.report import flat_scalars
from fr_distill.commands.eval import eval_main
from fr_distill.eval.tinyface import ResizedImages, cmc, label_of, load_tinyface, mate_ranks
from tests.conftest import fifos
from tests.eval_data import tiny_model, write_tinyface


def hand_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of 6 probes against 5 matched gallery images (identities 1, 1, 2, 3, 4) and 20
    distractors; every score exact in binary, so ties are exact."""
    gallery_labels = np.array([1, 1, 2, 3, 4] + [-1] * 20)
    probe_labels = np.array([1, 2, 3, 4, 4, 1])
    scores = np.full((6, 25), 0.125)
    scores[0, :2] = [0.875, 0.25]  # best mate first: rank 1
    scores[1, 2], scores[1, 5:8] = 0.5, [0.625, 0.75, 0.875]  # 3 distractors above: rank 4
    scores[2, 3], scores[2, 0], scores[2, 9] = 0.5, 0.875, 0.5  # a match above, a distractor tied: 3
    scores[3, 4], scores[3, 5:15] = 0.25, 0.375  # 10 distractors above: rank 11
    scores[4, 4] = 0.0625  # below all 24 others: rank 25
    scores[5] = 0.25  # constant scores (a collapsed model): all 23 non-mates tie: rank 24
    return scores, probe_labels, gallery_labels


def test_mate_ranks_and_cmc_hand_computed():
    scores, probe_labels, gallery_labels = hand_table()
    is_mate = torch.as_tensor(probe_labels[:, None] == gallery_labels[None, :])
    assert mate_ranks(torch.as_tensor(scores), is_mate).tolist() == [1, 4, 3, 11, 25, 24]
    # gallery features = the 25-d unit vectors, so each probe feature is its row of scores
    result = cmc(torch.as_tensor(scores), probe_labels, torch.eye(25, dtype=torch.float64),
                 gallery_labels, chunk_size=4)
    assert result == {"rank1": 1 / 6, "rank5": 3 / 6, "rank20": 4 / 6}
    no_mate = mate_ranks(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    assert no_mate.tolist() == [4]


@pytest.mark.parametrize("name, identity", [("1_3.jpg", 1), ("0042_7.png", 42), ("12_3_4.jpeg", 12)])
def test_identity_is_the_number_before_the_first_underscore(name, identity):
    assert label_of(f"/data/Probe/{name}") == identity


@pytest.mark.parametrize("name", ["abc_1.jpg", "12.jpg", "-1_2.jpg", "_3.jpg", "x12_3.jpg"])
def test_a_file_name_without_an_identity_is_refused(name):
    with pytest.raises(EvalDataError) as err:
        label_of(f"/data/Probe/{name}")
    assert str(err.value) == (f"/data/Probe/{name}: cannot read an identity from the file name "
                              f"(expected '<identity>_<n>.jpg', e.g. 1_3.jpg)")


def write_pair_file(testing_set: Path, names: list[str], ids: list[int]) -> Path:
    cells = np.empty((len(names), 1), dtype=object)
    cells[:, 0] = names
    path = testing_set / "probe_img_ID_pairs.mat"
    scipy.io.savemat(path, {"probe_set": cells, "probe_ids": np.array(ids, float).reshape(-1, 1)})
    return path


def test_release_layouts_and_order(tmp_path):
    testing_set = write_tinyface(tmp_path)
    for root in (tmp_path, tmp_path / "tinyface", testing_set):
        release = load_tinyface(root)
        assert release.testing_set == testing_set
        assert [Path(p).relative_to(testing_set).as_posix() for p in release.image_paths] == [
            "Probe/1_3.jpg", "Probe/2_3.jpg", "Gallery_Match/1_1.jpg", "Gallery_Match/2_1.jpg",
            "Gallery_Match/2_2.jpg", "Gallery_Distractor/900.jpg", "Gallery_Distractor/901.jpg"]
        assert release.labels.tolist() == [1, 2, 1, 2, 2, -1, -1]
        assert (release.num_probes, release.num_matches, release.num_distractors) == (2, 3, 2)
    write_pair_file(testing_set, ["2_3.jpg", "1_3.jpg"], [2, 1])  # the release's list agrees
    assert load_tinyface(tmp_path).labels.tolist() == [1, 2, 1, 2, 2, -1, -1]


def test_images_are_resized_whole_to_112_bilinear(tmp_path):
    testing_set = write_tinyface(tmp_path)
    path = testing_set / "Probe" / "1_3.jpg"
    loaded = ResizedImages([str(path)]).load(0, 1)[0]
    with Image.open(path) as image:
        assert image.size == (16, 20)
        expected = np.asarray(image.convert("RGB").resize((112, 112), Image.Resampling.BILINEAR))
    assert loaded.shape == (3, 112, 112) and np.array_equal(loaded.transpose(1, 2, 0), expected)


def message(root: Path) -> str:
    with pytest.raises(EvalDataError) as err:
        load_tinyface(root)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_releases_are_named_in_one_line(tmp_path):
    assert message(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: TinyFace release not found (no such directory)"
    (tmp_path / "empty").mkdir()
    assert message(tmp_path / "empty") == (f"{tmp_path / 'empty'}: not a TinyFace release: no Probe/ "
                                           "folder in it, in Testing_Set/ or in tinyface/Testing_Set/")
    testing_set = write_tinyface(tmp_path / "a")
    shutil.rmtree(testing_set / "Gallery_Distractor")
    assert message(tmp_path / "a") == (f"{testing_set / 'Gallery_Distractor'}: folder not found (a "
                                       "TinyFace test set has Probe/, Gallery_Match/, Gallery_Distractor/)")
    testing_set = write_tinyface(tmp_path / "b", distractors=())
    assert message(tmp_path / "b") == f"{testing_set / 'Gallery_Distractor'}: no .jpg/.jpeg/.png images in it"
    testing_set = write_tinyface(tmp_path / "c", matches=("1_1", "two_1"))
    assert message(tmp_path / "c").startswith(f"{testing_set / 'Gallery_Match' / 'two_1.jpg'}: cannot read an identity")
    testing_set = write_tinyface(tmp_path / "d", probes=("1_3", "7_2"))
    assert message(tmp_path / "d") == (f"{testing_set / 'Probe' / '7_2.jpg'}: identity 7 has no image "
                                       f"in {testing_set / 'Gallery_Match'}")


def test_an_image_name_that_is_no_file_is_named_not_skipped(tmp_path):
    """Before, a dangling link among the probes (or a FIFO among the distractors) was left out
    without a word, and the ranks were computed on another set than the release."""
    testing_set = write_tinyface(tmp_path)
    link = testing_set / "Probe" / "1_4.jpg"
    link.symlink_to(tmp_path / "moved" / "1_4.jpg")
    assert message(tmp_path) == (f"{link}: a dangling link (its target "
                                 f"{tmp_path / 'moved' / '1_4.jpg'} does not exist)")
    link.unlink()
    fifo = testing_set / "Gallery_Distractor" / "902.jpg"
    with fifos(fifo):
        assert message(tmp_path) == f"{fifo}: cannot read image (a FIFO, not a regular file)"


def test_pair_files_that_disagree_with_the_folders_are_named(tmp_path):
    testing_set = write_tinyface(tmp_path)
    mat = write_pair_file(testing_set, ["1_3.jpg", "2_3.jpg"], [1, 5])
    assert message(tmp_path) == f"{mat}: 2_3.jpg has identity 5, its file name says 2"
    write_pair_file(testing_set, ["1_3.jpg", "3_3.jpg"], [1, 3])
    assert message(tmp_path) == f"{mat}: 3_3.jpg is not in {testing_set / 'Probe'}"
    write_pair_file(testing_set, ["1_3.jpg"], [1])
    assert message(tmp_path) == f"{testing_set / 'Probe' / '2_3.jpg'}: not listed in {mat}"
    scipy.io.savemat(mat, {"probe_set": np.zeros((1, 1))})
    assert message(tmp_path) == f"{mat}: no variable 'probe_ids' in it"
    mat.write_bytes(b"not a MATLAB file")
    assert message(tmp_path).startswith(f"{mat}: cannot read it as a MATLAB file (")


def test_a_corrupt_image_stops_the_command_naming_it(tmp_path, capsys):
    testing_set = write_tinyface(tmp_path / "data")
    bad = testing_set / "Gallery_Distractor" / "901.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    torch.jit.script(tiny_model()).save(str(tmp_path / "model.pt"))
    code = eval_main(["--model", str(tmp_path / "model.pt"), "--tinyface", str(tmp_path / "data"),
                      "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.split("\r")[-1].strip()  # after the cleared progress bar
    assert code == 2 and error.startswith(f"error: {bad}: image cannot be decoded (")


def reference_cmc(feats: np.ndarray, labels: np.ndarray, num_probes: int, ranks=(1, 5, 20)) -> list:
    """AdaFace's tinyface_helper.DIR_FAR (closed set), written out: sort each probe's gallery
    scores from high to low and look for a same-identity image among the first k."""
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    scores = feats[:num_probes] @ feats[num_probes:].T
    same = labels[:num_probes, None] == labels[None, num_probes:]
    ordered = np.take_along_axis(same, np.argsort(-scores, axis=1), axis=1)
    return [float(ordered[:, :k].any(axis=1).mean()) for k in ranks]


def test_synthetic_release_through_the_command(synthetic_data, tmp_path, capsys):
    counts = json.loads((synthetic_data / "manifest.json").read_text())["counts"]["tinyface"]
    model = tiny_model(dim=16)
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    argv = ["--model", str(tmp_path / "model.pt"), "--tinyface", str(synthetic_data / "tinyface"),
            "--out", str(tmp_path / "out"), "--batch-size", "32", "--shard-size", "64"]
    assert eval_main(argv) == 0
    assert "TinyFace 1:N rank-1" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "results.json").read_text())["tinyface"]["TinyFace"]
    assert (result["probes"], result["gallery_match"], result["distractors"]) == (
        counts["probe"], counts["gallery_match"], counts["gallery_distractor"])
    assert 0.0 <= result["rank1"] <= result["rank5"] <= result["rank20"] <= 1.0
    assert result["rank20"] > result["rank1"]  # a random network: not a degenerate ranking
    assert flat_scalars({"tinyface": {"TinyFace": result}}) == {
        f"TinyFace/rank{k}": result[f"rank{k}"] for k in (1, 5, 20)}
    release = load_tinyface(synthetic_data / "tinyface")
    feats = extract_features(model, ResizedImages(release.image_paths), "cpu", 32, progress=False)
    expected = reference_cmc(feats.numpy().astype(np.float64), release.labels, release.num_probes)
    assert [result["rank1"], result["rank5"], result["rank20"]] == pytest.approx(expected, abs=1e-12)
