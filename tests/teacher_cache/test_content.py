"""``teacher.cache_verify_content``: a cache built from other images under the same names is
refused, naming the first image that differs."""
from __future__ import annotations

import shutil

import pytest

from fr_distill.config import load_config
from fr_distill.teacher_cache import CacheError
from fr_distill.engine.cache_teacher import build_cache
from fr_distill.teacher_cache.store import ROWS_FILE
from .conftest import SHARD, check, copy_of, overrides, refusal


def test_verify_content_refuses_a_cache_built_from_other_images_under_the_same_names(
        cache, synthetic_data, teacher_file, tmp_path, single_thread):
    """The default identity covers file names and labels, not the images' bytes: an image
    replaced by another under its name passes. With teacher.cache_verify_content the build
    records each image's sha256 (a new build, or one finished without them) and a run refuses,
    naming the first image that differs; a cache without digests is refused by such a run."""
    from fr_distill.teacher_cache.content import DIGESTS_FILE

    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "train", data / "train")
    verify = "teacher.cache_verify_content=true"
    assert refusal(data, teacher_file, cache, verify) == (
        f"teacher.cache {cache} holds no image digests (built with "
        f"teacher.cache_verify_content=false) but this run has teacher.cache_verify_content=true:"
        f" build the cache with it, or set it false")
    fresh = tmp_path / "fresh"
    build_cache(load_config(None, overrides(data, teacher_file, f"teacher.cache={fresh}", verify)),
                shard_samples=SHARD)
    assert (fresh / ROWS_FILE).read_bytes() == (cache / ROWS_FILE).read_bytes()
    assert (fresh / DIGESTS_FILE).stat().st_size == 192 * 32
    finished = copy_of(cache, tmp_path / "finished")  # complete, no digests: recorded now
    build_cache(load_config(None, overrides(data, teacher_file, f"teacher.cache={finished}",
                                            verify)), shard_samples=SHARD)
    assert (finished / DIGESTS_FILE).read_bytes() == (fresh / DIGESTS_FILE).read_bytes()
    assert check(data, teacher_file, fresh, verify)["image_digests"]
    first, second = sorted((data / "train").glob("*/*.jpg"))[5:7]
    first.write_bytes(second.read_bytes())
    assert check(data, teacher_file, fresh)["complete"]  # the default identity: names only
    assert refusal(data, teacher_file, fresh, verify) == (
        f"teacher.cache {fresh} was built from other images: {first} is not the image the cache "
        f"was built from (its sha256 differs; 1 of 192 images differ); build the cache again "
        f"from these images")
    with pytest.raises(CacheError, match=f"{first} is not the image the cache was built from .*"
                                         f"; pass --force to build it again from these images"):
        build_cache(load_config(None, overrides(data, teacher_file, f"teacher.cache={fresh}",
                                                verify)), shard_samples=SHARD)
