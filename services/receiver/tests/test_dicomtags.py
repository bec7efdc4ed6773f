"""shared.dicomtags on real-world files: charsets, compressed, multi-frame, private tags, broken data."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from shared.config.model import DEFAULT_EXTRACT_TAGS
from shared.dicomtags import TagExtractionError, extract_tags


def _local(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom test file {name} is missing"
    return str(path)


@pytest.mark.parametrize("name, expected", [
    ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
    ("chrX2.dcm", "Wang^XiaoDong=王^小东"),          # GB18030
    ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),    # ISO 2022 IR 149
    ("chrFren.dcm", "Buc^Jérôme"),                    # ISO_IR 100
    ("chrRuss.dcm", "Люкceмбypг"),
    ("chrArab.dcm", "قباني^لنزار"),
])
def test_charsets_decoded_to_unicode(name: str, expected: str) -> None:
    result = extract_tags(get_charset_files(name)[0], ["PatientName"])
    assert result.tags["PatientName"] == expected
    assert result.warnings == []


def test_fast_reader_charsets_memoised_by_value() -> None:
    """The fast reader remembers what each Specific Character Set value means: files with different
    charsets, read in turn and then again, decode as pydicom decodes them every time."""
    from shared.dicomtags import _CHARSET_MEMO

    names = ["chrH31.dcm", "chrX2.dcm", "chrFren.dcm", "chrI2.dcm", "chrRuss.dcm", "chrH31.dcm", "chrFren.dcm"]
    for name in names * 2:
        data = Path(get_charset_files(name)[0]).read_bytes()
        assert extract_tags(data, ["PatientName"]) == extract_tags(data, ["PatientName"], fast=False), name
    assert any(key is not None and b"ISO 2022 IR 87" in (key[1] or b"") for key in _CHARSET_MEMO)


def test_fast_reader_does_not_memoise_a_huge_charset_value() -> None:
    ds = pydicom.dcmread(get_charset_files("chrFren.dcm")[0])
    ds.SpecificCharacterSet = ["ISO_IR 100"] * 40  # 439 bytes: a sender controls this value
    buffer = io.BytesIO()
    ds.save_as(buffer)
    from shared.dicomtags import _CHARSET_MEMO

    assert extract_tags(buffer.getvalue(), ["PatientName"]).tags["PatientName"] == "Buc^Jérôme"
    assert all(key is None or len(key[1] or b"") <= 256 for key in _CHARSET_MEMO)


def test_charset_in_sequence_file_does_not_raise() -> None:
    result = extract_tags(get_charset_files("chrSQEncoding.dcm")[0], DEFAULT_EXTRACT_TAGS)
    assert result.tags["SpecificCharacterSet"] == "ISO_IR 192"


def test_bad_charset_falls_back_without_raising() -> None:
    ds = pydicom.dcmread(get_charset_files("chrFren.dcm")[0])
    ds.SpecificCharacterSet = "ISO_IR 9999"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    result = extract_tags(buffer.getvalue(), ["PatientName", "PatientID"])
    assert result.tags["PatientName"] == "Buc^Jérôme"  # Latin-1 bytes, read by the default fallback
    assert result.tags["PatientID"] == "SCSFREN"


def test_invalid_utf8_with_utf8_charset_falls_back() -> None:
    ds = pydicom.dcmread(get_charset_files("chrX1.dcm")[0])
    buffer = io.BytesIO()
    ds.save_as(buffer)
    raw = buffer.getvalue().replace(b"Wang^XiaoDong", b"W\xffng^XiaoDong")
    result = extract_tags(raw, ["PatientName"])
    assert result.tags["PatientName"].startswith("W")


@pytest.mark.parametrize("name, syntax", [
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
])
def test_compressed_and_other_syntaxes(name: str, syntax: str) -> None:
    result = extract_tags(_local(name), DEFAULT_EXTRACT_TAGS)
    assert result.transfer_syntax_uid == syntax
    assert result.sop_uid and result.sop_class_uid
    assert "Rows" in result.tags


def test_values_are_strings_multi_valued_joined() -> None:
    result = extract_tags(_local("MR_small.dcm"), ["ImageType", "PixelSpacing", "Rows", "PatientName"])
    assert result.tags["ImageType"] == "DERIVED\\SECONDARY\\OTHER"
    assert result.tags["PixelSpacing"] == "0.3125\\0.3125"
    assert result.tags["Rows"] == "64"
    assert result.tags["PatientName"] == "CompressedSamples^MR1"


def test_multiframe_rtdose() -> None:
    result = extract_tags(_local("rtdose.dcm"), ["NumberOfFrames", "Modality"])
    assert result.tags["NumberOfFrames"] == "15" and result.tags["Modality"] == "RTDOSE"


def _enhanced_ct(frames: int) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2.1")  # Enhanced CT
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.PatientName, ds.ImageType = "CT", "Enhanced^Frames", ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    shared = Dataset()
    measures = Dataset()
    measures.SliceThickness = "1.25"
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i in range(frames):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, i * 1.25]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"\x00\x01" * 16 * frames
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_enhanced_multiframe_with_functional_groups() -> None:
    result = extract_tags(_enhanced_ct(50), DEFAULT_EXTRACT_TAGS + ["SharedFunctionalGroupsSequence"])
    assert result.tags["NumberOfFrames"] == "50"
    assert result.tags["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL\\NONE"
    assert "SharedFunctionalGroupsSequence" not in result.tags  # sequences are not rule values
    assert result.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.mark.parametrize("form", ["({group:04X},{element:04X})", "{group:04X}{element:04X}"])
def test_private_tags_by_hex(form: str) -> None:
    ds = pydicom.dcmread(_local("CT_small.dcm"))
    block = ds.private_block(0x0041, "CADUCEUS TEST", create=True)
    block.add_new(0x01, "LO", "odd value")
    tag = block.get_tag(0x01)
    ds.add_new(0x00431010, "OB", b"\x00\x01binary")
    buffer = io.BytesIO()
    ds.save_as(buffer)
    name = form.format(group=tag >> 16, element=tag & 0xFFFF)
    result = extract_tags(buffer.getvalue(), [name, "(0043,1010)", "NoSuchKeyword"])
    assert result.tags[name] == "odd value"
    assert "(0043,1010)" not in result.tags  # binary values are not rule material
    assert "NoSuchKeyword" not in result.tags


def test_from_path_and_bytes_agree(tmp_path: Path) -> None:
    path = _local("CT_small.dcm")
    assert extract_tags(path, DEFAULT_EXTRACT_TAGS) == extract_tags(Path(path).read_bytes(), DEFAULT_EXTRACT_TAGS)


def test_file_meta_element_of_the_wrong_length_raises_extraction_error(tmp_path: Path) -> None:
    """(0002,0000) UL with 3 bytes: pydicom raises BytesLengthException (a RuntimeError), which
    must come out as TagExtractionError (quarantine and 0xC000 in the receiver, a clear message in
    `caduceus rule test --file`), never as an unexpected exception. Found by mutating test files."""
    raw = bytearray(Path(_local("CT_small.dcm")).read_bytes())
    assert raw[132:138] == b"\x02\x00\x00\x00UL"
    raw[138:140] = b"\x03\x00"  # the element after it now starts a byte early
    path = tmp_path / "bad-meta.dcm"
    path.write_bytes(bytes(raw))
    for source in (bytes(raw), path):
        with pytest.raises(TagExtractionError):
            extract_tags(source, DEFAULT_EXTRACT_TAGS)


def test_mutated_files_give_tags_or_an_extraction_error() -> None:
    """Seeded mutations of every pydicom test file (bytes flipped, lengths blown up, cut short):
    extract_tags returns tags or raises TagExtractionError, nothing else. (A wider run of this,
    10^4 cases per seed, found the File Meta BytesLengthException above.)"""
    import random

    rnd = random.Random(20261129)
    for path in _all_pydicom_files():
        data = path.read_bytes()
        if len(data) > 1_000_000:
            continue
        for _ in range(6):
            mutated = bytearray(data[:rnd.randrange(132, len(data) + 1)] if rnd.random() < 0.3 else data)
            for _ in range(rnd.randrange(1, 4)):
                at = rnd.randrange(128, max(129, min(len(mutated) - 4, 3000)))
                if rnd.random() < 0.7:
                    mutated[at] = rnd.randrange(256)
                else:
                    mutated[at:at + 4] = rnd.choice([b"\xff\xff\xff\xff", b"\x03\x00\x00\x00", b"\x01\x00UL"])
            try:
                extract_tags(bytes(mutated), DEFAULT_EXTRACT_TAGS)
            except TagExtractionError:
                pass


@pytest.mark.parametrize("cut", [1000, 6000, 20000, 39000])
def test_truncated_data_raises(cut: int) -> None:
    raw = Path(_local("CT_small.dcm")).read_bytes()
    with pytest.raises(TagExtractionError, match="truncated"):
        extract_tags(raw[:cut], DEFAULT_EXTRACT_TAGS)


def _element_ends(raw: bytes) -> tuple[int, set[int], int]:
    """(data set start, offsets where a top-level element ends, start of the pixel data value or the end)."""
    stream = io.BytesIO(raw)
    read_preamble(stream, True)
    meta = _read_file_meta_info(stream)
    start = stream.tell()
    syntax = meta.TransferSyntaxUID
    ends, pixel_value = {start}, len(raw)
    for element in data_element_generator(stream, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=1):
        ends.add(stream.tell())
        if element.tag == 0x7FE00010:
            assert isinstance(element, RawDataElement)  # the generator yields raw elements
            pixel_value = element.value_tell
    return start, ends, pixel_value


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", ["CT_small.dcm", "ExplVR_BigEnd.dcm", "rtplan.dcm"])
def test_a_cut_inside_any_element_is_refused(name: str, fast: bool) -> None:
    """Data cut anywhere but between two top-level elements are refused. A cut inside an element's
    header used to pass (pydicom's reader stops at a short header without a word), and a CT without
    its pixel data was stored, routed and sent on."""
    raw = Path(_local(name)).read_bytes()
    start, ends, pixel_value = _element_ends(raw)
    cuts = {*range(start + 1, start + 700), *range(pixel_value - 40, pixel_value + 8)}
    accepted = []
    for cut in sorted(cut for cut in cuts - ends if start < cut < len(raw)):
        try:
            tags = extract_tags(raw[:cut], DEFAULT_EXTRACT_TAGS, fast=fast)
        except TagExtractionError:
            continue
        if tags.study_uid and tags.series_uid and tags.sop_uid:  # else the receiver quarantines it too
            accepted.append(cut)
    assert accepted == []


@pytest.mark.parametrize("fast", [True, False])
def test_zero_padding_after_the_last_element_is_tolerated_a_stray_byte_is_not(fast: bool) -> None:
    raw = Path(_local("rtplan.dcm")).read_bytes()
    assert extract_tags(raw + b"\0\0", DEFAULT_EXTRACT_TAGS, fast=fast).sop_uid
    with pytest.raises(TagExtractionError, match="incomplete element header"):
        extract_tags(raw + b"\0", DEFAULT_EXTRACT_TAGS, fast=fast)
    with pytest.raises(TagExtractionError, match="incomplete element header|not a readable"):
        extract_tags(raw + b"\x08\x00\x20", DEFAULT_EXTRACT_TAGS, fast=fast)


def test_truncated_encapsulated_raises() -> None:
    raw = Path(_local("JPEG2000.dcm")).read_bytes()
    with pytest.raises(TagExtractionError, match="truncated"):
        extract_tags(raw[:-100], DEFAULT_EXTRACT_TAGS)


@pytest.mark.parametrize("data", [b"", b"hello world", bytes(range(256)) * 20])
def test_garbage_raises(data: bytes) -> None:
    with pytest.raises(TagExtractionError):
        extract_tags(data, DEFAULT_EXTRACT_TAGS)


def _explicit(group: int, element: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, size) + value
    return struct.pack("<HH2sH", group, element, vr, size) + value


_IDENTITY = b"".join(_explicit(0x0008, e, b"UI", v) for e, v in ((0x0016, b"1.2.840.10008.5.1.4.1.1.2\0"),
                                                                 (0x0018, b"1.2.3.4.5\0")))
_UIDS = _explicit(0x0020, 0x000D, b"UI", b"1.2.3\0") + _explicit(0x0020, 0x000E, b"UI", b"1.2.3.4\0")
_OPEN_SEQUENCE = (_explicit(0x0040, 0xA730, b"SQ", b"", 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
                  + _explicit(0x0040, 0xA040, b"CS", b"TEXT"))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("case, body, syntax", [
    ("sequence and item never end", _IDENTITY + _UIDS + _OPEN_SEQUENCE, ExplicitVRLittleEndian),
    ("sequence never ends, identity inside", _IDENTITY + _OPEN_SEQUENCE + _UIDS, ExplicitVRLittleEndian),
    ("item claims more than the data", _IDENTITY + _UIDS + _explicit(0x0040, 0xA730, b"SQ", b"", 0xFFFFFFFF)
     + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFF00) + b"x" * 20, ExplicitVRLittleEndian),
    ("length 0xFFFFFFF0 in a small file", _IDENTITY + _UIDS + _explicit(0x0029, 0x1001, b"OB", b"x" * 10, 0xFFFFFFF0),
     ExplicitVRLittleEndian),
    ("pixel data claiming 2 GB", _IDENTITY + _UIDS + _explicit(0x7FE0, 0x0010, b"OW", b"x" * 10, 0x80000000),
     ExplicitVRLittleEndian),
    ("deflate claimed, not deflated", _IDENTITY + _UIDS, "1.2.840.10008.1.2.1.99"),
])
def test_hostile_structures_are_refused(case: str, body: bytes, syntax: str, fast: bool) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4.5")
    meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    with pytest.raises(TagExtractionError):
        extract_tags(buffer.getvalue() + body, DEFAULT_EXTRACT_TAGS, fast=fast)


# ---------------------------------------------------------------- fast reader vs pydicom

_DIFF_KEYWORDS = [*DEFAULT_EXTRACT_TAGS, "(0019,10A1)", "ImagePositionPatient", "WindowCenter",
                  "SmallestImagePixelValue", "ReferencedImageSequence", "TransferSyntaxUID", "(0029,1010)"]


def _outcome(data: bytes, fast: bool) -> object:
    try:
        return extract_tags(data, _DIFF_KEYWORDS, fast=fast)
    except TagExtractionError as exc:
        return ("TagExtractionError", str(exc))


def _all_pydicom_files() -> list[Path]:
    import os

    from pydicom.data import get_testdata_files

    names = set(get_testdata_files()) | set(get_charset_files())
    return sorted(Path(n) for n in names if os.path.isfile(n))


def test_fast_reader_matches_pydicom_on_every_test_file() -> None:
    """The fast header reader gives exactly pydicom's results, on whole and on truncated files."""
    from shared.dicomtags import _fast_read, _Unusual, _wanted_tags

    files = _all_pydicom_files()
    assert len(files) > 150
    handled = 0
    mismatches = []
    for path in files:
        data = path.read_bytes()
        for cut in (len(data), len(data) // 2, len(data) - 3, 700):
            variant = data[:cut]
            if _outcome(variant, True) != _outcome(variant, False):
                mismatches.append(f"{path.name}[:{cut}]")
            try:
                _fast_read(variant, _wanted_tags(_DIFF_KEYWORDS))
                handled += 1
            except (_Unusual, ValueError, IndexError, struct.error):  # what extract_tags catches
                pass
    assert mismatches == []
    assert handled > 100  # the comparison is about the fast reader, not only its fallback


def test_fast_reader_skips_undefined_length_sequences() -> None:
    """Enhanced multi-frame: functional groups are undefined-length sequences before the wanted tags."""
    from shared.dicomtags import _fast_read, _wanted_tags

    ds = pydicom.dcmread(io.BytesIO(_enhanced_ct(3)))
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        ds[keyword].is_undefined_length = True
        for item in ds[keyword].value:
            item.is_undefined_length_sequence_item = True
            for nested in item:
                if nested.VR == "SQ":
                    nested.is_undefined_length = True  # nested sequences too
    ds.ContentDescription = "after the sequences"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue()
    assert b"\xfe\xff\xdd\xe0" in data  # really written with sequence delimiters
    keywords = [*DEFAULT_EXTRACT_TAGS, "ContentDescription"]
    _fast_read(data, _wanted_tags(keywords))  # handled, not left to pydicom
    assert extract_tags(data, keywords) == extract_tags(data, keywords, fast=False)
    assert extract_tags(data, keywords).tags["ContentDescription"] == "after the sequences"


def test_a_memory_mapped_file_reads_as_its_bytes(tmp_path: Path) -> None:
    """The receiver's spooled instances are read through a memory map (never copied): same tags,
    same errors, whole or cut, through the fast reader and its pydicom fallback."""
    import mmap

    for path in _all_pydicom_files():
        data = path.read_bytes()
        for cut in (len(data), len(data) - 3, 700):
            variant = data[:cut]
            if not variant:
                continue
            copy = tmp_path / "mapped.dcm"
            copy.write_bytes(variant)
            with open(copy, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                assert _outcome(view, True) == _outcome(variant, True), f"{path.name}[:{cut}]"  # type: ignore[arg-type]


def test_a_memory_mapped_file_is_not_copied(tmp_path: Path) -> None:
    import mmap
    import tracemalloc

    from tests.e2e.dicomfiles import write_large_instance

    path = write_large_instance(tmp_path / "large.dcm", 64)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        tracemalloc.start()
        try:
            tags = extract_tags(view, DEFAULT_EXTRACT_TAGS)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert tags.tags["Modality"] == "MG" and tags.tags["NumberOfFrames"] == "32"
    assert peak < 4 << 20, f"{peak >> 20} MB allocated to read the header of a 64 MB file"
