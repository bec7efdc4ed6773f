"""Manifests: the list of instances a series/study batch holds, stored as a blob.

The router writes one when it completes a batch; dispatcher and processor read it. Events refer to
it by `manifest_key`, so an event stays small whatever the size of the series.
"""

from __future__ import annotations

from pydantic import BaseModel

from shared.blobstore import BlobStore, blob_key


class ManifestInstance(BaseModel):
    sop_uid: str
    series_uid: str
    study_uid: str
    blob_key: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str
    size: int
    stream_seq: int
    # shared.blobstore.receipt_stamp of the copy routed: a local blob file with this modification
    # time holds it (0: unknown, e.g. an older manifest; then only its sha256 tells).
    received_stamp: int = 0


class Manifest(BaseModel):
    batch_id: str
    level: str  # "series" | "study"
    study_uid: str
    series_uids: list[str]
    instances: list[ManifestInstance]
    calling_aet: str = ""
    peer_host: str = ""


def manifest_key(batch_id: str) -> str:
    return blob_key("manifests", f"{batch_id}.json")


async def write_manifest(store: BlobStore, manifest: Manifest) -> str:
    key = manifest_key(manifest.batch_id)
    await store.put(key, manifest.model_dump_json().encode())
    return key


async def read_manifest(store: BlobStore, key: str) -> Manifest:
    return Manifest.model_validate_json(await store.get(key))
