"""Every error this project raises on purpose.

::

    RvibError                     base; ``str(e)`` is the message a caller can act on
    ├── InvalidRequestError       the build request cannot be built as asked
    ├── DatasetError              a blob's bytes do not match the request (size, values)
    ├── ObjectStoreError          S3 said no; message names operation, bucket and key
    │   ├── ObjectNotFoundError
    │   ├── BucketNotFoundError
    │   ├── AccessDeniedError
    │   ├── TransientStoreError   throttling, 5xx, timeouts, resets (after retries)
    │   └── IntegrityError        size or checksum mismatch after transfer
    ├── BuildError                Faiss (CPU or GPU) failed to build or serialize
    │   └── GpuUnavailableError   a GPU build was asked for where none can run
    ├── CancelledError            an operator cancelled the job
    └── ServiceError              raised by the HTTP service only
        ├── Unauthorized          credentials missing or wrong (401)
        ├── BucketNotAllowed      the bucket is not in the allow-list (403)
        ├── JobConflictError      same job id, different parameters (409)
        ├── JobNotFoundError      unknown or long expired job (404)
        ├── StoreFullError        job store full of active jobs (429)
        ├── InsufficientMemoryError  the job can never fit in the limits (507)
        ├── UnreadableRequestError   a stored request this version cannot parse (fleet)
        └── ServiceUnavailableError  shutting down (503)
            └── JobStoreUnavailableError  the fleet's Redis cannot be reached (503)

Foreign exceptions (botocore, faiss, redis) are translated once, where they are
raised, with ``raise X(...) from exc``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RvibError(Exception):
    """Base of every error raised on purpose by this project."""


class InvalidRequestError(RvibError):
    pass


class DatasetError(RvibError):
    pass


class ObjectStoreError(RvibError):
    """``code`` is S3's error code ("NoSuchUpload", "SlowDown", ...) when S3 answered one."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ObjectNotFoundError(ObjectStoreError):
    pass


class BucketNotFoundError(ObjectStoreError):
    pass


class AccessDeniedError(ObjectStoreError):
    pass


class TransientStoreError(ObjectStoreError):
    pass


class IntegrityError(ObjectStoreError):
    pass


class BuildError(RvibError):
    pass


class GpuUnavailableError(BuildError):
    pass


class CancelledError(RvibError):
    pass


class ServiceError(RvibError):
    pass


class Unauthorized(ServiceError):
    pass


class BucketNotAllowed(ServiceError):
    pass


class JobConflictError(ServiceError):
    pass


class JobNotFoundError(ServiceError):
    pass


class StoreFullError(ServiceError):
    pass


class InsufficientMemoryError(ServiceError):
    pass


class UnreadableRequestError(ServiceError):
    pass


class ServiceUnavailableError(ServiceError):
    """``retry_after_s``: when the caller should try again (the 503's ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobStoreUnavailableError(ServiceUnavailableError):
    pass


def problem_message(error: Mapping[str, Any]) -> str:
    """One pydantic validation error as its reader should see it.

    A validator's ``ValueError`` reaches pydantic's list as "Value error, <text>":
    the text alone is what the validator meant to say.
    """
    if error.get("type") == "value_error":
        cause = error.get("ctx", {}).get("error")
        if cause is not None:
            return str(cause)
    return str(error.get("msg", ""))
