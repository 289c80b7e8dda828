"""HTTP status of every error a handler raises, and the worker thread handlers run in.

Malformed id / tag / params 400, not allowed for this role 403, unknown 404, conflict with the server
state 409, content that is not a usable chest CT / label map 422, no model yet 503. The server's own
disk: full 507, read-only 409 -- nothing is stored half (every write is atomic), and the message says so.
"""
from __future__ import annotations

import errno
import logging

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)

from hybrid_ct.errors import InputError, ModelNotReadyError

from .store import UnknownVersionError
from .validation import BadRequest, Conflict, Forbidden, NotFound, scrub

logger = logging.getLogger(__name__)


def to_http(e: Exception) -> HTTPException:
    if isinstance(e, HTTPException):
        return e
    if isinstance(e, (NotFound, UnknownVersionError, ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(404, _msg(e))
    if isinstance(e, Forbidden):
        return HTTPException(403, _msg(e))
    if isinstance(e, Conflict):
        return HTTPException(409, _msg(e))
    if isinstance(e, BadRequest):
        return HTTPException(400, _msg(e))
    if isinstance(e, InputError):
        return HTTPException(422, _msg(e))
    if isinstance(e, ModelNotReadyError):
        return HTTPException(503, _msg(e))
    if isinstance(e, MONAILabelException):
        return HTTPException(400 if e.error == MONAILabelError.INVALID_INPUT else 500, _msg(e))
    raise e


def _msg(e: Exception) -> str:
    return scrub(getattr(e, "msg", None) or str(e) or type(e).__name__, {})


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (InputError, ModelNotReadyError, MONAILabelException) as e:
        raise to_http(e) from None
    except OSError as e:  # the server's own disk: nothing was stored (writes are atomic), say so plainly
        if e.errno in DISK_FULL:
            logger.error("disk full: %s", e)
            raise HTTPException(507, "the server's disk is full: nothing was stored; free space on the server "
                                     "and send it again") from None
        if e.errno in READ_ONLY:
            logger.error("cannot write: %s", e)
            raise HTTPException(409, "the server's studies or model folder is read-only: nothing was stored "
                                     "(reads and inference still work)") from None
        raise


async def in_thread(fn, *args, **kwargs):
    return await run_in_threadpool(guarded, fn, *args, **kwargs)


