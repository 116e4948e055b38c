"""Uploaded models: a safetensors checkpoint to quantize, named in a job as ``model:{id}``.

Upload the raw file as the request body::

    curl -X POST --data-binary @model.safetensors \\
         -H 'Content-Type: application/octet-stream' \\
         'http://127.0.0.1:8000/models?name=model.safetensors'

The body is streamed to a temporary file (never held whole in memory) and counted: past
``TSPTQ_MAX_UPLOAD_BYTES`` the upload stops with 413 and nothing is stored. The file is then
checked as safetensors without trusting it (header length, header JSON, every tensor's dtype,
shape and byte range, the data exactly covered). Pickles and zip files (``torch.save``) are
refused with 415: loading them could run arbitrary code.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from typing import IO, Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.errors import responses
from api.schemas import ModelOut

router = APIRouter(prefix="/models", tags=["models"])

ID = re.compile(r"^[0-9a-f]{32}$")
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # a NUL cannot even be stored in PostgreSQL text
MAX_HEADER_BYTES = 100 << 20
SPOOL_BYTES = 1 << 20  # kept in memory below this, on disk above
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
REFUSED = "pickle/zip checkpoints are refused: upload safetensors"


class BadFile(ValueError):
    """The upload is not a valid safetensors file (the message says why)."""


class RefusedFormat(BadFile):
    """The upload is a pickle or a zip (``torch.save``): never loaded, refused."""


def check_safetensors(f: IO[bytes], size: int) -> int:
    """Check that ``f`` (``size`` bytes) is a well-formed safetensors file; returns the number
    of tensors. Raises ``RefusedFormat`` for pickles and zips, ``BadFile`` otherwise."""
    f.seek(0)
    head = f.read(8)
    try:
        return _check(f, head, size)
    except BadFile:
        # A valid safetensors file may begin with 0x80 (a header of 128 bytes, say): the magic
        # numbers decide only what to call a file that failed.
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
            raise RefusedFormat(REFUSED) from None
        raise


def _check(f: IO[bytes], head: bytes, size: int) -> int:
    if size < 8:
        raise BadFile(f"not a safetensors file: {size} bytes, shorter than the 8-byte header "
                      "length")
    n = int.from_bytes(head, "little")
    if n == 0 or n > MAX_HEADER_BYTES:
        raise BadFile(f"not a safetensors file: header length {n} is not in 1..{MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise BadFile(f"truncated safetensors file: the header needs {n} bytes, the file has "
                      f"{size - 8} after the length")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except UnicodeDecodeError:
        raise BadFile("not a safetensors file: the header is not UTF-8") from None
    except RecursionError:
        raise BadFile("not a safetensors file: the header JSON is nested too deeply") from None
    except ValueError as e:
        raise BadFile(f"not a safetensors file: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadFile("not a safetensors file: the header is not a JSON object")
    data_bytes = size - 8 - n
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict)
                    and all(isinstance(v, str) for v in entry.values())):
                raise BadFile("bad safetensors header: __metadata__ must map strings to strings")
            continue
        ranges.append(_tensor_range(name, entry))
    if not ranges:
        raise BadFile("the safetensors file holds no tensors")
    ranges.sort()
    end = 0
    for begin, stop, name in ranges:
        if begin != end:
            raise BadFile(f"bad safetensors file: tensor {name!r} starts at byte {begin} of the "
                          f"data, expected {end} (overlap or gap)")
        end = stop
    if end != data_bytes:
        what = "truncated safetensors file" if end > data_bytes else "bad safetensors file"
        raise BadFile(f"{what}: the tensors need {end} bytes of data, the file has "
                      f"{data_bytes}")
    return len(ranges)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_range(name: str, entry: Any) -> tuple[int, int, str]:
    bad = f"bad safetensors header: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise BadFile(f"{bad} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise BadFile(f"{bad} has an unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise BadFile(f"{bad}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1]):
        raise BadFile(f"{bad}: data_offsets must be [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise BadFile(f"{bad}: {dtype} of shape {shape} does not fill its data_offsets "
                      f"{offsets}")
    return offsets[0], offsets[1], name


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=ModelOut,
    responses=responses(413, 415, 422, 503),
    openapi_extra={"requestBody": {
        "required": True,
        "description": "the safetensors file itself (curl --data-binary @model.safetensors)",
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}}},
    summary="Upload a model checkpoint (safetensors)")
async def upload_model(
    request: Request, response: Response, store: StoreDep, settings: SettingsDep,
    name: Annotated[str, Query(min_length=1, max_length=255, pattern=NAME_PATTERN,
                               description="a name to remember it by (no control characters)",
                               )] = "model.safetensors",
) -> ModelOut:
    """Store a safetensors checkpoint; answers 201 with ``Location: /models/{id}`` and the
    ``weights`` value (``model:{id}``) to use in ``POST /jobs``. Nothing is ever unpickled."""
    limit = settings.max_upload_bytes
    too_large = HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                              f"upload exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as f:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large  # stop reading; nothing was stored
            await run_in_threadpool(f.write, chunk)
        try:
            await run_in_threadpool(check_safetensors, f, size)
        except RefusedFormat as e:
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(e)) from None
        except BadFile as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None
        f.seek(0)
        model = await run_in_threadpool(store.add_model, name, f, limit)
    response.headers["Location"] = f"/models/{model.id}"
    return ModelOut.from_model(model)


@router.get("", response_model=list[ModelOut], responses=responses(422, 503),
            summary="Uploaded models, newest first")
def list_models(store: StoreDep,
                limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[ModelOut]:
    """What a job can name as ``weights`` (the dashboard's submit form lists them)."""
    return [ModelOut.from_model(m) for m in store.list_models(limit)]


@router.get("/{model_id}", response_model=ModelOut, responses=responses(404, 422, 503),
            summary="An uploaded model")
def get_model(model_id: str, store: StoreDep) -> ModelOut:
    model = store.get_model(model_id) if ID.match(model_id) else None
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no uploaded model {model_id!r}")
    return ModelOut.from_model(model)
