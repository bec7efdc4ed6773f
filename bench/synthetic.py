"""Synthetic DICOM series for tests and benchmarks (no dependency outside this repository).

`write_series(out, n, size=512, studies=1, series_per_study=1, modality="CT")` writes n slices per
series of size x size 16-bit pixels (explicit VR little endian), based on pydicom's CT_small
header (MR_small for modality MR), with fresh Study/Series/SOP Instance UIDs. Same arguments as the workplace's
make_series.py tool, so benchmark figures stay comparable.

    python -m bench.synthetic OUTDIR N [--size 512] [--studies 1] [--series-per-study 1] [--modality CT]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def write_series(out: Path, n: int, size: int = 512, studies: int = 1, series_per_study: int = 1,
                 modality: str = "CT") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # MR files get pydicom's MR header (its SOP class and MR attributes); everything else the CT one.
    template_name = "MR_small.dcm" if modality == "MR" else "CT_small.dcm"
    template = dcmread(get_testdata_file(template_name))  # type: ignore[arg-type]
    # Deterministic noise: compresses like real CT noise would not, and is the same in every run.
    pixels = bytes(b & 0x07 if i % 2 else b for i, b in enumerate(random.Random(0).randbytes(size * size * 2)))
    paths: list[Path] = []
    for study_index in range(studies):
        study_uid = generate_uid()
        for series_index in range(series_per_study):
            series_uid = generate_uid()
            for slice_index in range(n):
                ds = template.copy()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.Modality = modality
                ds.InstanceNumber, ds.SeriesNumber = slice_index + 1, series_index + 1
                ds.PatientName, ds.PatientID = f"SYNTH^{study_index:03d}", f"SYN{study_index:05d}"
                ds.SeriesDescription = f"AXIAL {series_index}"
                ds.Rows = ds.Columns = size
                ds.PixelData = pixels
                path = out / f"st{study_index}_se{series_index}_{slice_index:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return sorted(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--studies", type=int, default=1)
    parser.add_argument("--series-per-study", type=int, default=1)
    parser.add_argument("--modality", default="CT")
    args = parser.parse_args()
    write_series(args.out, args.n, args.size, args.studies, args.series_per_study, args.modality)


if __name__ == "__main__":
    main()
