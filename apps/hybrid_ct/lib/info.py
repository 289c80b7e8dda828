"""Reads of image / label info (404 for an id the datastore does not hold) and who may delete final labels.

An id is only looked up in the datastore's index, never resolved as a path: ``../../etc/passwd`` is simply
an unknown image (404), as is any other id the datastore does not list.
"""
from __future__ import annotations

from monailabel.config import settings
from monailabel.interfaces.utils.app import app_instance

from .validation import TAG_RE, NotFound

# set by lib/guard.TokenMiddleware on every request that carried a valid API token: "annotator" or "admin"
TOKEN_ROLE_STATE = "hybrid_ct_token_role"


def get_image_info(image: str) -> dict:
    ds = app_instance().datastore()
    if not (isinstance(image, str) and image):
        raise NotFound("no image id given")
    info = ds.get_image_info(image)
    if not info and image not in set(ds.list_images()):  # a PACS series has no local info until it is used
        raise NotFound(f"image {image!r} is not in the datastore")
    return info


def get_label_info(label: str, tag: str) -> dict:
    ds = app_instance().datastore()
    if not (isinstance(label, str) and label and isinstance(tag, str) and TAG_RE.match(tag)) \
            or not ds.get_label_uri(label, tag):
        raise NotFound(f"no {tag!r} label for {label!r} in the datastore")
    return ds.get_label_info(label, tag)


def may_delete_final(request) -> bool:
    """May this caller delete a final label (or an image that has one)? Only the admin: the admin API token
    (``--conf admin_token_file``), or the admin role of MONAI Label's own authentication (its RBAC has
    already checked the role on the route). On a server without either, nobody may: final labels are the
    training data, and an open server cannot tell a radiologist from anyone else on the network."""
    role = (request.scope.get("state") or {}).get(TOKEN_ROLE_STATE)
    if role is not None:
        return role == "admin"
    return bool(settings.MONAI_LABEL_AUTH_ENABLE)
