"""PACS and VLCS in the DomainBed layout: one folder per domain, one subfolder per class.

On-disk layout (``root`` may be the ``PACS`` / ``VLCS`` folder itself or the folder containing it)::

    PACS/{art_painting,cartoon,photo,sketch}/{dog,elephant,giraffe,guitar,horse,house,person}/*.jpg|png
    VLCS/{Caltech101,LabelMe,SUN09,VOC2007}/{bird,car,chair,dog,person}/*.jpg

(``python -m domainbed.scripts.download --data_dir <dir>`` from https://github.com/facebookresearch/DomainBed
produces it; the original PACS archive's ``kfold/`` folder is the same layout and is accepted too.)

Protocols: by default all domains are concatenated and split at random 80 / 10 / 10 into train / val /
test (``val_fraction`` and the 10 % test share are shares of the whole dataset), as the group's TLC
code does. With ``test_domain=<domain>`` the split is leave-one-domain-out: that domain is the test
split, and ``val_fraction`` of the other domains is held out for validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .augment import Augment
from .images import _image_splits, _take, scan_class_folders
from .splits import DatasetError, DataSplits, holdout_split, three_way_split

__all__ = ["PACS", "VLCS", "DomainSpec", "load_domainbed"]

_TEST_SHARE = 0.1


@dataclass(frozen=True)
class DomainSpec:
    """A DomainBed dataset: its name, folder, domains (in DomainBed's order) and classes (label order)."""

    name: str
    folder: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    url: str

    def hint(self) -> str:
        return (
            f"download {self.folder} with DomainBed (python -m domainbed.scripts.download --data_dir <dir>; "
            f"archive {self.url}) and pass root=<dir containing {self.folder}>; expected "
            f"{self.folder}/<domain>/<class>/*.jpg|png with domains {', '.join(self.domains)} "
            f"and classes {', '.join(self.classes)}"
        )


PACS = DomainSpec(
    "pacs", "PACS", ("art_painting", "cartoon", "photo", "sketch"),
    ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
    "https://drive.google.com/uc?id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
)
VLCS = DomainSpec(
    "vlcs", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    ("bird", "car", "chair", "dog", "person"),
    "https://drive.google.com/uc?id=1skwblH1_okBwxWxmRsp9_qi15hyPpxg8",
)


def _locate(spec: DomainSpec, root: str | None) -> Path:
    if root is None:
        raise DatasetError(f"no root given for {spec.name}; {spec.hint()}")
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset folder {base} does not exist; {spec.hint()}")
    for candidate in (base / spec.folder, base, base / "kfold", base / spec.folder / "kfold"):
        present = [d for d in spec.domains if (candidate / d).is_dir()]
        if present:
            missing = [d for d in spec.domains if d not in present]
            if missing:
                raise DatasetError(f"{candidate} lacks the domain folders {', '.join(missing)}; {spec.hint()}")
            return candidate
    raise DatasetError(f"{base} holds neither {spec.folder}/ nor its domain folders; {spec.hint()}")


def _resolve_domain(spec: DomainSpec, test_domain: str) -> str:
    """The domain named ``test_domain`` (exactly, or ignoring case); ValueError listing them otherwise."""
    for domain in spec.domains:
        if test_domain == domain or test_domain.lower() == domain.lower():
            return domain
    raise ValueError(f"unknown test_domain {test_domain!r} for {spec.name}; domains: {', '.join(spec.domains)}")


def load_domainbed(
    spec: DomainSpec,
    root: str | None,
    *,
    val_fraction: float,
    seed: int,
    limit: int | None,
    augment: Augment | None = None,
    image_size: int | None = None,
    test_domain: str | None = None,
) -> DataSplits:
    """PACS or VLCS (see the module doc); images resized to ``image_size`` (default 224)."""
    held_out = _resolve_domain(spec, test_domain) if test_domain is not None else None
    folder = _locate(spec, root)
    paths: list[Path] = []
    labels: list[np.ndarray] = []
    domain_of: list[np.ndarray] = []
    for d, domain in enumerate(spec.domains):
        domain_paths, domain_labels, _ = scan_class_folders(folder / domain, spec.classes, "; " + spec.hint())
        if not domain_paths:
            raise DatasetError(f"{folder / domain} holds no images in class folders; {spec.hint()}")
        paths.extend(domain_paths)
        labels.append(domain_labels)
        domain_of.append(np.full(len(domain_labels), d))
    all_files = (paths, np.concatenate(labels))
    domains = np.concatenate(domain_of)

    if held_out is None:
        train, val, test = three_way_split(len(paths), val_fraction, _TEST_SHARE, seed)
    else:
        test = np.flatnonzero(domains == spec.domains.index(held_out))
        rest = np.flatnonzero(domains != spec.domains.index(held_out))
        kept, held = holdout_split(rest, val_fraction, seed, stratify=False)
        train, val = rest[kept], rest[held]
    files = {"train": _take(all_files, train), "val": _take(all_files, val), "test": _take(all_files, test)}
    return _image_splits(spec.name, files, spec.classes, limit=limit, augment=augment,
                        image_size=image_size or 224, seed=seed)
