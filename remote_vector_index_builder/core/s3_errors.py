"""botocore and urllib3 exceptions, translated into ``core.errors``.

Foreign exceptions are translated once, here: the object store and its multipart
writer retry what ``retryable`` accepts and raise what ``translate`` returns, so
their callers see ``core.errors`` types only.
"""

from __future__ import annotations

from botocore import exceptions as bce
from urllib3.exceptions import ProtocolError

from remote_vector_index_builder.core import errors
from remote_vector_index_builder.core.errors import ObjectStoreError

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_DENIED |= {"ExpiredToken", "InvalidToken", "AllAccessDisabled", "KMS.AccessDeniedException"}
_CHANGED = {"PreconditionFailed", "412"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}
_TRANSIENT |= {"InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
_NO_CREDS = (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)


# Its name reaches the job's error message ("BodyCut: body ended after ...").
class BodyCut(ConnectionError):
    """A body that ended early: the connection was cut."""


class Corrupt(Exception):
    """A body other than the one asked for."""


# SSLError is a ConnectionError too, but a certificate problem does not heal by retrying.
_TRANSIENT_IO: tuple[type[Exception], ...] = (bce.HTTPClientError, bce.ConnectionError)
_TRANSIENT_IO += (bce.IncompleteReadError, ProtocolError, ConnectionError, TimeoutError)
_CORRUPT_IO = (bce.FlexibleChecksumError, bce.ChecksumError, Corrupt)


def code_of(exc: bce.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code_of(exc) in _TRANSIENT or status >= 500
    return isinstance(exc, _TRANSIENT_IO + _CORRUPT_IO) and not isinstance(exc, bce.SSLError)


def bucket_missing(where: str) -> errors.BucketNotFoundError:
    return errors.BucketNotFoundError(
        f"{where} failed: bucket does not exist; check container_name and the "
        "S3 endpoint and region of the service"
    )


def translate(exc: Exception, where: str, attempts: int) -> ObjectStoreError:
    """Our error for a botocore/urllib3 one; ``where`` reads "<op> of s3://b/k (detail)".

    The S3 error code, if S3 answered with one, is kept as the error's ``code``.
    """
    error = _translate(exc, where, attempts)
    if isinstance(exc, bce.ClientError):
        error.code = code_of(exc) or None
    return error


def _translate(exc: Exception, where: str, attempts: int) -> ObjectStoreError:
    if isinstance(exc, bce.ClientError):
        code = code_of(exc)
        if code == "NoSuchBucket":
            return bucket_missing(where)
        if code in _NOT_FOUND:
            return errors.ObjectNotFoundError(
                f"{where} failed: object does not exist; check vector_path / doc_id_path "
                "and that the client finished uploading it"
            )
        if code in _DENIED:
            return errors.AccessDeniedError(
                f"{where} failed: access denied ({code}); check the service's AWS "
                "credentials, the bucket policy (S3 answers 403 for a missing key when "
                "s3:ListBucket is not granted) and, for SSE-KMS objects, the KMS key policy"
            )
        if code in _CHANGED:
            return errors.IntegrityError(
                f"{where} failed: the object was replaced while it was being read "
                "(its ETag changed); start the build again once the writer has finished"
            )
        if not retryable(exc):
            message = exc.response.get("Error", {}).get("Message", "")
            return ObjectStoreError(f"{where} failed: S3 error {code}: {message}")
    elif isinstance(exc, _NO_CREDS):
        return errors.AccessDeniedError(
            f"{where} failed: no usable AWS credentials ({exc}); configure the standard "
            "credential chain (environment, profile, instance or pod role)"
        )
    elif isinstance(exc, _CORRUPT_IO):
        return errors.IntegrityError(
            f"{where} failed: the data arrived corrupt {attempts} time(s) ({exc}); "
            "if the object itself is intact, retrying the build may succeed"
        )
    elif isinstance(exc, bce.EndpointConnectionError) and not isinstance(
        exc, bce.ConnectTimeoutError
    ):
        # Refused or unresolvable: retried like any connection error (a server may be
        # restarting), but when every attempt met it, the endpoint is the likely cause.
        return ObjectStoreError(
            f"{where} failed: could not connect to the S3 endpoint after {attempts} "
            f"attempt(s) ({exc}); check S3_ENDPOINT_URL (--endpoint-url) and that the server "
            "is up and reachable from here"
        )
    elif not retryable(exc):
        return ObjectStoreError(f"{where} failed: {type(exc).__name__}: {exc}")
    return errors.TransientStoreError(
        f"{where} failed after {attempts} attempt(s): {_cause(exc)}; the error is "
        "transient (throttling, 5xx, timeout or reset): the build is retryable"
    )


def _cause(exc: Exception) -> str:
    # botocore's own wording says "reached max retries: 0" (we retry, it does not) and,
    # for a body that stalls, names the endpoint URL "None".
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"S3 answered {status} {error.get('Code', '')}: {error.get('Message', '')}"
    if isinstance(exc, (bce.ReadTimeoutError, TimeoutError)):
        return "ReadTimeoutError: no data arrived within the read timeout"
    return f"{type(exc).__name__}: {exc}"
