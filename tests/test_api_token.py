"""Closed by default, part 2: with an API token (``--conf api_token_file`` or $HYBRID_CT_API_TOKEN) every
write and inference needs ``Authorization: Bearer <token>`` (401 without it, 200 with it); deleting images and
labels needs the admin token (``--conf admin_token_file``: 403 with the annotators' token); reads stay
open; the tokens never reach the logs."""
import json
import sys
from pathlib import Path

import pytest
from server_fixture import UNLABELLED, http, phantom_files, start_server, stop_server

APP_DIR = str(Path(__file__).resolve().parents[1] / "apps" / "hybrid_ct")
if APP_DIR not in sys.path:
    sys.path.insert(0, APP_DIR)

TOKEN = "s3cret-token-for-tests-7f1c"
ADMIN = "adm1n-token-for-tests-93e0"


@pytest.fixture(scope="module")
def closed(tmp_path_factory):
    from hybrid_ct.net.model_files import default_model_path

    work = tmp_path_factory.mktemp("token_server")
    token_file = work / "api_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    admin_file = work / "admin_token"
    admin_file.write_text(ADMIN + "\n")
    server = start_server(work, model=default_model_path(), conf={"api_token_file": str(token_file),
                                                                  "admin_token_file": str(admin_file)})
    yield server
    stop_server(server)


def _auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def _calls(tmp_path):
    """(name, method, path, kwargs factory, token): every write route and infer, in an order that works with a
    token; the deletes need the admin token."""
    img, lab, _, _ = phantom_files(tmp_path, seed=11)
    label = {"label": ("l.nii.gz", lab.read_bytes()), "params": (None, "{}")}
    return [
        ("infer", "POST", "/infer/hybrid_ct", lambda: dict(params={"image": UNLABELLED[0], "output": "json"},
                                                            files={"params": (None, "{}")})),
        ("upload image", "PUT", "/datastore/image", lambda: dict(params={"image": "tok_case"},
                                                                  files={"file": ("c.nii.gz", img.read_bytes())})),
        ("image info", "PUT", "/datastore/image/info", lambda: dict(params={"image": "tok_case"},
                                                                     data={"info": json.dumps({"diagnosis": "negative"})})),
        ("save label", "PUT", "/datastore/label", lambda: dict(params={"image": "tok_case", "tag": "final"},
                                                                files=dict(label))),
        ("delete label", "DELETE", "/datastore/label", lambda: dict(params={"id": "tok_case", "tag": "final"}), ADMIN),
        ("delete image", "DELETE", "/datastore/image", lambda: dict(params={"id": "tok_case"}), ADMIN),
        ("train", "POST", "/train/hybrid_ct", lambda: dict(json={"max_epochs": 1})),
        ("stop training", "DELETE", "/train/", lambda: {}),
    ]


def test_writes_and_infer_need_the_token(closed, tmp_path):
    s, url = http(), closed.url
    for name, method, path, kw, *token in _calls(tmp_path):
        token = token[0] if token else TOKEN
        for headers in ({}, _auth("wrong"), {"Authorization": f"Basic {TOKEN}"}):
            r = s.request(method, url + path, headers=headers, timeout=60, **kw())
            assert r.status_code == 401, (name, headers, r.status_code, r.text)
            assert r.headers.get("WWW-Authenticate") == "Bearer" and TOKEN not in r.text and ADMIN not in r.text
        if token == ADMIN:  # the annotators' token may not delete: final labels are training data
            r = s.request(method, url + path, headers=_auth(), timeout=60, **kw())
            assert r.status_code == 403 and "admin token" in r.json()["detail"], (name, r.status_code, r.text)
        r = s.request(method, url + path, headers=_auth(token), timeout=600, **kw())
        assert r.status_code == 200, (name, r.status_code, r.text)


def test_rollback_needs_the_token(closed):
    s, url = http(), closed.url
    assert s.post(url + "/hybrid_ct/rollback", params={"version": "x"}, timeout=60).status_code == 401
    # with the token the request reaches the app (an unknown version is its 404, not the token's 401)
    assert s.post(url + "/hybrid_ct/rollback", params={"version": "x"}, headers=_auth(), timeout=60).status_code == 404


def test_reads_stay_open(closed):
    s, url = http(), closed.url
    assert s.get(url + "/info/", timeout=60).status_code == 200
    assert s.get(url + "/datastore/", params={"output": "all"}, timeout=60).status_code == 200
    assert s.get(url + "/hybrid_ct/versions", timeout=60).status_code == 200
    assert s.post(url + "/activelearning/first", json={}, timeout=60).status_code == 200
    assert s.get(url + "/no/such/path", headers=_auth(), timeout=60).status_code == 404  # the allowlist still rules


def test_token_never_logged(closed):
    text = closed.log_path.read_text(errors="replace") + (closed.workdir / "server.stdout").read_text(errors="replace")
    assert "API token (from --conf api_token_file) is required" in text
    assert "role admin" in text
    assert TOKEN not in text and ADMIN not in text


def test_token_sources(tmp_path, monkeypatch):
    from lib.guard import TOKEN_ENV, api_token
    from lib.routes import needs_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert api_token({}) is None
    monkeypatch.setenv(TOKEN_ENV, " from-env ")
    assert api_token({}) == "from-env"
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert api_token({"api_token_file": str(f)}) == "from-file"  # the file wins over the environment
    f.write_text("\n")
    with pytest.raises(ValueError, match="holds no token"):
        api_token({"api_token_file": str(f)})
    with pytest.raises(ValueError, match="cannot read"):
        api_token({"api_token_file": str(tmp_path / "missing")})
    from lib.guard import ADMIN_TOKEN_ENV, api_tokens
    from lib.routes import token_rule

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert api_tokens({}) == {"from-env": "annotator"}
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "boss")
    assert api_tokens({}) == {"from-env": "annotator", "boss": "admin"}
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    with pytest.raises(ValueError, match="same"):
        api_tokens({})
    assert token_rule("DELETE", "/datastore/label") == token_rule("DELETE", "/datastore/") == "admin"
    assert token_rule("PUT", "/datastore/label") == "any" and token_rule("GET", "/datastore/label/info") == ""
    assert needs_token("POST", "/infer/hybrid_ct") and needs_token("DELETE", "/train/")
    assert not needs_token("GET", "/info/") and not needs_token("POST", "/activelearning/random")


def test_unreadable_token_file_stops_the_start(tmp_path):
    with pytest.raises(RuntimeError, match="exited"):
        start_server(tmp_path / "srv", model=False, conf={"api_token_file": str(tmp_path / "missing")},
                     startup_timeout_s=120)


def test_the_slicer_client_sends_the_token(closed, monkeypatch):
    """The extension's client: without the token an inference is refused with a message that says how to
    set it; with $HYBRID_CT_API_TOKEN (or api_token=) it runs; reads work either way."""
    ext = str(Path(__file__).resolve().parents[1] / "slicer_extension")
    if ext not in sys.path:
        sys.path.insert(0, ext)
    from hybrid_ct_slicer.client import API_TOKEN_ENV, HybridCTClient, ServerError

    monkeypatch.delenv(API_TOKEN_ENV, raising=False)
    anonymous = HybridCTClient(closed.url)
    assert anonymous.info()["name"]
    with pytest.raises(ServerError) as refused:
        anonymous.infer("hybrid_ct", UNLABELLED[0], output="json")
    assert refused.value.status == 401 and API_TOKEN_ENV in str(refused.value)
    monkeypatch.setenv(API_TOKEN_ENV, TOKEN)
    res = HybridCTClient(closed.url).infer("hybrid_ct", UNLABELLED[0], output="json")
    assert res.params["classification"]["label"] in ("positive", "negative", "indeterminate")
    assert HybridCTClient(closed.url, api_token="wrong").info()["name"]
