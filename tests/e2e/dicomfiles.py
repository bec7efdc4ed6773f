"""DICOM test material for end-to-end tests: crafted series, real-world files, byte comparisons."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from shared.blobstore import blob_key


def recast_series(files: list[Path], out_dir: Path, *, modality: str, description: str) -> list[Path]:
    """Copies of `files` as a new series (new Series/SOP Instance UIDs) with another Modality."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    made = []
    for path in files:
        ds = dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = modality
        ds.SeriesDescription = description
        target = out_dir / path.name
        ds.save_as(target, enforce_file_format=True)
        made.append(target)
    return made


def dataset_bytes(data: bytes | Path) -> bytes:
    """The bytes after the file meta group (what travels in a C-STORE), without decoding anything."""
    raw = data.read_bytes() if isinstance(data, Path) else data
    if raw[128:132] != b"DICM":
        return raw
    offset = 132
    # File meta elements are explicit VR little endian; walk them until group 0002 ends.
    while offset + 8 <= len(raw):
        group, _element = struct.unpack_from("<HH", raw, offset)
        if group != 0x0002:
            break
        vr = raw[offset + 4:offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length = struct.unpack_from("<I", raw, offset + 8)[0]
            offset += 12 + length
        else:
            length = struct.unpack_from("<H", raw, offset + 6)[0]
            offset += 8 + length
    return raw[offset:]


def blob_path(blob_root: Path, path_or_ds: Path | Dataset) -> Path:
    ds = dcmread(path_or_ds, stop_before_pixels=True) if isinstance(path_or_ds, Path) else path_or_ds
    key = blob_key("instances", str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), f"{ds.SOPInstanceUID}.dcm")
    return blob_root.joinpath(*key.split("/"))


# Real-world files shipped with pydicom: character sets, multi-frame, compressed, private tags.
REAL_WORLD = {
    "ISO_IR 100 (Latin-1)": "chrFren.dcm",
    "ISO 2022 IR 87 (Japanese)": "chrH31.dcm",
    "ISO 2022 IR 13 + IR 87": "chrH32.dcm",
    "ISO 2022 IR 149 (Korean)": "chrI2.dcm",
    "ISO_IR 192 (UTF-8)": "chrX1.dcm",
    "GB18030": "chrX2.dcm",
    "ISO_IR 144 (Cyrillic)": "chrRuss.dcm",
    "multi-frame RT Dose, RLE": "rtdose_rle.dcm",
    "enhanced multi-frame Segmentation (functional groups)": "liver_1frame.dcm",
    "JPEG 2000 lossless": "MR_small_jp2klossless.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "RLE lossless": "MR_small_RLE.dcm",
    "RLE 2-frame RGB, UTF-8": "SC_rgb_rle_2frame.dcm",
}


def real_world_files(out_dir: Path) -> dict[str, Path]:
    """Copies of the REAL_WORLD files, each with its own SOP Instance UID (several of pydicom's
    files share one) and otherwise untouched, plus one CT with odd private tags."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for label, name in REAL_WORLD.items():
        source = _pydicom_file(name)
        ds = dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out_dir / f"{Path(name).stem}.dcm"
        ds.save_as(target, enforce_file_format=True)
        made[label] = target
    made["odd private tags"] = _odd_private_tags(out_dir / "odd_private.dcm")
    return made


def _pydicom_file(name: str) -> str:
    found = get_testdata_file(name) or next(iter(get_charset_files(name)), None)
    if found is None:
        raise FileNotFoundError(f"pydicom test file {name} missing")
    return str(found)


def _odd_private_tags(target: Path) -> Path:
    """CT_small (already has GE private groups) plus private blocks a router must not choke on:
    a creator with odd characters, an odd-length UN value, a private sequence, a duplicate creator."""
    ds = dcmread(_pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    block = ds.private_block(0x0009, "ÄCME ¡odd! créator", create=True)
    block.add_new(0x01, "UN", b"\x01\x02\x03")
    block.add_new(0x02, "LO", "x" * 64)
    inner = Dataset()
    inner.add_new(0x00100010, "PN", "Nested^Private")
    block.add_new(0x03, "SQ", [inner])
    other = ds.private_block(0x0011, "CADUCEUS TEST", create=True)
    other.add_new(0x10, "OB", bytes(range(256)) * 4)
    ds.save_as(target, enforce_file_format=True)
    return target


def same_dataset(a: Path | bytes, b: Path | bytes) -> bool:
    """Same elements with the same values in two files' data sets (VRs aside: DCMTK's storescu
    sends an explicit "UN" standard element with its dictionary VR, and pads odd-length values), ignoring Data Set Trailing
    Padding (FFFC,FFFC), which storescu does not transmit (make_series files carry it)."""
    left, right = (pydicom.dcmread(io.BytesIO(x) if isinstance(x, bytes) else x) for x in (a, b))
    tags = {t for t in left.keys() if t != 0xFFFCFFFC}
    if tags != {t for t in right.keys() if t != 0xFFFCFFFC}:
        return False
    return all(_same_value(left[t].value, right[t].value) for t in tags)


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, bytes) and isinstance(b, bytes) and len(a) % 2 != len(b) % 2:
        # An odd-length binary value (invalid DICOM) is padded to even length by the sender.
        return a + b"\x00" == b or a == b + b"\x00"
    return a == b


def pixel_bytes(data: bytes | Path) -> bytes:
    handle = io.BytesIO(data) if isinstance(data, bytes) else data
    return bytes(pydicom.dcmread(handle).PixelData)


BREAST_TOMOSYNTHESIS = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.13.1.3")


def write_large_instance(path: Path, megabytes: int, *, study_uid: str | None = None) -> Path:
    """A multi-frame instance of about `megabytes` MB, written in well under a second: its header
    through pydicom, its pixel data (zeros, 16 bits, 1024x1024 frames) as a sparse extension.

    Breast Tomosynthesis is not among the SOP classes storescu proposes by default: send it with
    storescu's `-R` (propose the files' own classes)."""
    template = dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds = template.copy()
    del ds.PixelData
    del ds[0xFFFCFFFC]  # (data set trailing padding: it would come after the pixel data appended below)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BREAST_TOMOSYNTHESIS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.SeriesDescription = "MG", "TOMO"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = frames = max(1, megabytes // 2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.save_as(path, enforce_file_format=True)
    length = frames * 1024 * 1024 * 2
    with open(path, "r+b") as handle:
        end = handle.seek(0, 2)
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        handle.truncate(end + 12 + length)
    return path
