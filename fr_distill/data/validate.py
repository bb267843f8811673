"""Full validation of a training set (``tools/validate_data.py``): decode every image.

First the pre-flight header/size check lists every bad entry (corrupt, truncated, non-image,
wrong size, empty class, index problems); then every remaining image is fully decoded.
The report holds all problems by file/record name and the per-class image counts (classes of
several sets named ``k:name``, set ``k`` of the list).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from .dataset import SampleBytes, scan
from .decode import decode_rgb
from .errors import DataError


@dataclass
class ValidationReport:
    """Problems found (one line each) and image counts per class name (folder) or label (rec)."""

    root: str
    format: str
    num_images: int
    problems: list[str] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def validate_dataset(train: str | list[str], fmt: str = "auto", progress: bool = True
                     ) -> ValidationReport:
    """Check headers, then decode every image of ``train``; collects problems instead of raising
    (except for errors that make the whole set unreadable, such as a missing ``.idx``)."""
    info = scan(train, fmt, check=True)
    report = ValidationReport(info.root, info.format, info.num_samples, list(info.bad))
    images = SampleBytes(info)
    decoded_ok = Counter()
    for i in tqdm(range(info.num_samples), desc="validate", unit="img", disable=not progress):
        try:
            decode_rgb(images[i], images.name(i))
        except DataError as err:
            report.problems.append(str(err))
            continue
        decoded_ok[int(info.labels[i])] += 1
    names = info.class_names or [str(label) for label in range(info.num_classes)]
    report.class_counts = {name: decoded_ok.get(label, 0) for label, name in enumerate(names)}
    return report
