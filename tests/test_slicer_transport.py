"""Issue 28 point 7: honesty and transport of the Slicer module's client (Qt-free package).

- https with a hospital certificate authority: a real TLS server on 127.0.0.1 with a certificate signed
  by a CA made here; the client trusts it through ``REQUESTS_CA_BUNDLE`` / ``HYBRID_CT_CA_BUNDLE`` / an
  explicit bundle, and refuses it without;
- a warning when the API token would go over plain http to another computer;
- Cancel during Submit against the real server: the message says the server may already have saved the
  correction, and it indeed has;
- the research-use notice is in the results the module stores.
"""

from __future__ import annotations

import http.server
import json
import shutil
import ssl
import subprocess
import threading
import time

import pytest

from hybrid_ct_slicer.client import HybridCTClient, ServerError
from hybrid_ct_slicer.identity import resolve_identity
from hybrid_ct_slicer.jobs import JobRunner
from hybrid_ct_slicer.panel import RESEARCH_NOTICE, cancel_message
from hybrid_ct_slicer.testdata import make_chest_volume
from hybrid_ct_slicer.transport import tls_verify, transport_warning
from hybrid_ct_slicer.workflow import Workflow

from server_fixture import http as plain_session, server  # noqa: F401  (the real app server)

CA_ENVS = ("HYBRID_CT_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture()
def tls_server(tmp_path, monkeypatch):
    """An https server on 127.0.0.1 whose certificate is signed by a private CA ("the hospital's")."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test CA")
    for name in CA_ENVS:
        monkeypatch.delenv(name, raising=False)
    d = str(tmp_path)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=Hospital Test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1",
             cwd=d)
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
             "srv.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"name": "TLS test", "version": "1", "models": {"hybrid_ct": {}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tmp_path / "srv.pem"), str(tmp_path / "srv.key"))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", str(tmp_path / "ca.pem")
    httpd.shutdown()


def test_https_with_a_hospital_ca(tls_server, monkeypatch):
    url, ca = tls_server
    with pytest.raises(ServerError, match="TLS/SSL error"):
        HybridCTClient(url, timeout=10).info()  # the private CA is not trusted by default
    assert HybridCTClient(url, timeout=10, ca_bundle=ca).info()["name"] == "TLS test"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)  # what hospitals set for every Python tool
    client = HybridCTClient(url, timeout=10)
    assert client.session.verify == ca and client.info()["name"] == "TLS test"
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.setenv("HYBRID_CT_CA_BUNDLE", ca)
    assert HybridCTClient(url, timeout=10).info()["name"] == "TLS test"
    assert tls_verify(False, ca) is False
    with pytest.raises(ValueError, match="does not exist"):
        tls_verify(True, "/nonexistent/ca.pem")


def test_api_token_over_plain_http_is_warned_about(monkeypatch):
    monkeypatch.delenv("HYBRID_CT_API_TOKEN", raising=False)
    assert "API token is sent over plain http" in HybridCTClient("http://10.0.0.5:8000", api_token="s3cret").transport_warning()
    assert "API token" not in HybridCTClient("http://10.0.0.5:8000").transport_warning()
    assert HybridCTClient("https://10.0.0.5:8000", api_token="s3cret").transport_warning() == ""
    assert HybridCTClient("http://127.0.0.1:8000", api_token="s3cret").transport_warning() == ""
    assert transport_warning("http://pacs.hospital.org", True).startswith("The API token")


def _submit_job(server, tmp_path, seed):
    ct, label, geometry = make_chest_volume(shape=(12, 64, 64), seed=seed)
    identity = resolve_identity(ct, geometry)
    client = HybridCTClient(server.url, timeout=60, long_timeout=900)
    runner = JobRunner()
    job = runner.start("Submit correction",
                       lambda j: Workflow(client, str(tmp_path), j.progress, lambda: j.cancelled, j.mark_sent)
                       .submit_volume_correction(identity, ct, geometry, label, geometry))
    return runner, job, identity


def _final_label_status(server, image_id):
    return plain_session().get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "final"},
                               timeout=30).status_code


def test_cancel_during_submit_says_the_server_may_have_saved_it(server, tmp_path):
    runner, job, identity = _submit_job(server, tmp_path, 21)
    deadline = time.monotonic() + 120
    while not any("correction" in s for s in job.sent):  # the label is on its way to the server
        assert time.monotonic() < deadline and not job.error, job.error
        time.sleep(0.001)
    sent = job.sent
    assert runner.cancel(job)
    text = cancel_message(job.name, sent)
    assert "cancelled — the server may already have" in text and "saved the correction" in text
    job.wait(120)
    assert _final_label_status(server, identity.image_id) == 200  # it was saved: a bare "cancelled" would lie


def test_cancel_before_anything_is_sent_says_so(server, tmp_path):
    runner, job, identity = _submit_job(server, tmp_path, 22)
    assert runner.cancel(job)  # at once: the worker stops at its first check
    sent = job.sent
    job.wait(120)
    if not job.sent:  # (the worker may have raced ahead; then the other test's message applies)
        assert "nothing was sent" in cancel_message(job.name, sent)
        assert _final_label_status(server, identity.image_id) == 404
    assert "nothing was sent" in cancel_message("Next sample", [])


def test_research_notice_in_the_results():
    from hybrid_ct_slicer.results import format_results, result_lines

    lines = result_lines(format_results({"classification": {"label": "positive", "probability": 0.91}}))
    assert lines[0] == RESEARCH_NOTICE and "not for diagnosis" in RESEARCH_NOTICE
    assert any("Positive" in line for line in lines)
