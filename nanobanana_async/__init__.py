"""nanobanana-async: an asyncio client for the AceData Cloud Nano Banana image API.

Submit with [`NanoBananaClient.generate`][] or [`edit`][NanoBananaClient.edit], then
wait with [`await_completion`][NanoBananaClient.await_completion]: every wait on one client shares
one poll loop that reads many tasks per request.
"""

from ._client import NanoBananaClient, TaskRef
from ._errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    DownloadError,
    NanoBananaError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    TaskFailedError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from ._models import (
    ErrorDetail,
    ImageResult,
    Submission,
    Task,
    TaskBatch,
    TaskResponse,
    TaskState,
)
from ._retry import RetryPolicy
from ._version import __version__

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "DownloadError",
    "ErrorDetail",
    "ImageResult",
    "NanoBananaClient",
    "NanoBananaError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseDecodeError",
    "RetryPolicy",
    "ServerError",
    "Submission",
    "Task",
    "TaskBatch",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskRef",
    "TaskResponse",
    "TaskState",
    "TaskTimeoutError",
    "__version__",
]
