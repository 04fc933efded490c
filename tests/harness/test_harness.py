"""The harness, checked against the real components it drives.

These tests start a real docker-registry, containerd, skopeo and podman (CI installs them; a
missing one fails with the package to install, it is never skipped). Each test has its own
servers in its own temp dir, all on 127.0.0.1.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from benchmarks.harness.clients import (
    DEAD_UPSTREAM,
    Containerd,
    check_hosts_dir,
    podman_pull,
    reference_host,
    registry_endpoints,
    skopeo_copy,
    write_hosts_toml,
    write_registries_conf,
)
from benchmarks.harness.image import Image, make_image, push_image, size_error_bound
from benchmarks.harness.procs import HarnessError, MissingBinaryError, Process, require_binary
from benchmarks.harness.regauth import ChallengeAuth, parse_challenge
from benchmarks.harness.registry import BasicAuth, Registry, parse_log_line
from benchmarks.harness.tokenserver import TokenRequestError, TokenServer, parse_scope

NAME = "example.test"
SIZES = [100_000, 1_000_000, 5_000_000]
ALICE = ("alice", "wonderland")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return make_image(42, SIZES, workdir=tmp_path_factory.mktemp("image"))


def assert_pulled_once_each(registry: Registry, image: Image) -> None:
    for digest in image.blobs:
        assert registry.blob_gets(digest) == 1, digest
    assert registry.blob_bytes_served() == image.total_size


# -- images ------------------------------------------------------------------------------------


def test_make_image_is_deterministic_sized_and_consistent(image: Image, tmp_path: Path) -> None:
    again = make_image(42, SIZES, workdir=tmp_path / "again")
    assert again.manifest == image.manifest
    assert again.layer_digests == image.layer_digests
    other = make_image(43, SIZES[:1], workdir=tmp_path / "other")
    assert other.layer_digests[0] != image.layer_digests[0]

    for size, layer in zip(SIZES, image.layers, strict=True):
        assert size - size_error_bound(size) <= layer.size <= size
        data = layer.path.read_bytes()
        assert layer.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        # Random content: gzip must not have been able to shrink it.
        assert len(gzip.decompress(data)) >= layer.size - 2048

    config = json.loads(image.config.path.read_bytes())
    diff_ids = [
        "sha256:" + hashlib.sha256(gzip.decompress(layer.path.read_bytes())).hexdigest()
        for layer in image.layers
    ]
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    manifest = json.loads(image.manifest)
    assert manifest["config"]["digest"] == image.config_digest
    assert [layer["digest"] for layer in manifest["layers"]] == image.layer_digests
    assert image.manifest_digest == "sha256:" + hashlib.sha256(image.manifest).hexdigest()
    assert image.total_size == sum(b.size for b in image.blobs.values())


# -- the registry ------------------------------------------------------------------------------


def test_registry_serves_v2_on_loopback_and_stops(tmp_path: Path) -> None:
    with Registry(tmp_path / "registry") as registry:
        assert registry.url.startswith("http://127.0.0.1:")
        response = httpx.get(f"{registry.url}/v2/")
        assert response.status_code == 200
        assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        pid = registry.pid
        registry.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{registry.url}/v2/")
        url = registry.url
        registry.start()  # an outage: same address, same storage
        assert registry.url == url and registry.pid != pid
        assert httpx.get(f"{registry.url}/v2/").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{registry.url}/v2/")


def test_blob_counter_counts_body_gets_only(tmp_path: Path, image: Image) -> None:
    layer = image.layers[1]
    with Registry(tmp_path / "registry") as registry:
        push_image(registry.url, "library/app", "v1", image)
        assert registry.blob_gets(layer.digest) == 0  # pushing is not serving
        url = f"{registry.url}/v2/library/app/blobs/{layer.digest}"
        assert httpx.head(url).status_code == 200
        assert registry.blob_gets(layer.digest) == 0
        assert httpx.get(url).content == layer.path.read_bytes()
        ranged = httpx.get(url, headers={"Range": "bytes=1000-"})
        assert ranged.status_code == 206
        assert registry.blob_gets(layer.digest) == 2
        assert registry.blob_bytes_by_digest() == {layer.digest: 2 * layer.size - 1000}
        # A blob the registry does not have: 404, counts nothing.
        missing = "sha256:" + "0" * 64
        assert httpx.get(f"{registry.url}/v2/library/app/blobs/{missing}").status_code == 404
        assert registry.blob_gets(missing) == 0


def test_log_line_parsing() -> None:
    line = (
        '127.0.0.1 - - [27/Nov/2026:05:26:09 +0000] "GET /v2/a/b/blobs/sha256:ab12?ns=x '
        'HTTP/1.1" 206 15900 "" "containerd/1.6.20~ds1"'
    )
    record = parse_log_line(line)
    assert record is not None
    assert (record.method, record.status, record.written) == ("GET", 206, 15900)
    assert record.blob_digest == "sha256:ab12"
    assert record.user_agent == "containerd/1.6.20~ds1"
    assert record.served_blob_bytes
    manifest = parse_log_line(line.replace("/blobs/", "/manifests/"))
    assert manifest is not None and manifest.blob_digest is None
    logrus = 'time="x" level=info msg="response completed" http.request.method=GET'
    assert parse_log_line(logrus) is None


# -- containerd --------------------------------------------------------------------------------


def test_ctr_pull_direct_fetches_each_blob_once(tmp_path: Path, image: Image) -> None:
    with Registry(tmp_path / "registry") as registry, Containerd(tmp_path / "ctd") as ctd:
        push_image(registry.url, "library/app", "v1", image)
        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, NAME, registry.url)
        result = ctd.pull(f"{NAME}/library/app:v1", hosts_dir=hosts)
        assert result.seconds > 0
        assert f"{NAME}/library/app:v1" in ctd.image_names()
        assert_pulled_once_each(registry, image)
        agents = {r.user_agent for r in registry.requests() if r.served_blob_bytes}
        assert agents and all(a.startswith("containerd/") for a in agents)


def test_containerd_content_store_is_shared_and_reset_makes_pulls_cold(
    tmp_path: Path, image: Image
) -> None:
    ref = f"{NAME}/library/app:v1"
    with Registry(tmp_path / "registry") as registry, Containerd(tmp_path / "ctd") as ctd:
        push_image(registry.url, "library/app", "v1", image)
        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, NAME, registry.url)
        ctd.pull(ref, hosts_dir=hosts, namespace="one")
        ctd.pull(ref, hosts_dir=hosts, namespace="two")  # other namespace, same content store
        assert registry.blob_gets(image.layer_digests[0]) == 1
        ctd.reset()
        ctd.pull(ref, hosts_dir=hosts, namespace="one")
        assert registry.blob_gets(image.layer_digests[0]) == 2


def test_ctr_falls_back_to_server_when_mirror_fails_unless_told_not_to(
    tmp_path: Path, image: Image
) -> None:
    ref = f"{NAME}/library/app:v1"
    dead_mirror = DEAD_UPSTREAM  # nothing listens there: every request is refused
    with Registry(tmp_path / "registry") as registry, Containerd(tmp_path / "ctd") as ctd:
        push_image(registry.url, "library/app", "v1", image)
        with_fallback = tmp_path / "fallback"
        write_hosts_toml(with_fallback, NAME, registry.url, dead_mirror)
        ctd.pull(ref, hosts_dir=with_fallback)
        assert_pulled_once_each(registry, image)

        ctd.reset()
        without = tmp_path / "no-fallback"
        write_hosts_toml(without, NAME, registry.url, dead_mirror, fallback=False)
        with pytest.raises(HarnessError, match="connection refused"):
            ctd.pull(ref, hosts_dir=without)
        assert registry.blob_gets(image.layer_digests[0]) == 1


def test_hosts_dir_check_refuses_what_would_leave_the_machine(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"no .*hosts.toml"):
        check_hosts_dir(tmp_path, f"{NAME}/app:v1")
    server_only = tmp_path / NAME / "hosts.toml"
    server_only.parent.mkdir()
    server_only.write_text('server = "http://127.0.0.1:5000"\n')
    with pytest.raises(HarnessError, match=r"no \[host"):
        check_hosts_dir(tmp_path, f"{NAME}/app:v1")
    write_hosts_toml(tmp_path, NAME, "http://127.0.0.1:5000", "http://127.0.0.1:65001")
    check_hosts_dir(tmp_path, f"{NAME}/app:v1")
    assert reference_host("library/app") == "docker.io"
    assert reference_host("localhost:5000/app") == "localhost:5000"


# -- skopeo and podman -------------------------------------------------------------------------


def test_skopeo_copy_direct(tmp_path: Path, image: Image) -> None:
    with Registry(tmp_path / "registry") as registry:
        push_image(registry.url, "library/app", "v1", image)
        conf = write_registries_conf(tmp_path / "registries.conf", NAME, registry.host)
        out = tmp_path / "out"
        skopeo_copy(f"{NAME}/library/app:v1", registries_conf=conf, out_dir=out)
        for digest, blob in image.blobs.items():
            assert (out / digest.removeprefix("sha256:")).read_bytes() == blob.path.read_bytes()
        assert_pulled_once_each(registry, image)


def test_podman_pull_direct(tmp_path: Path, image: Image) -> None:
    with Registry(tmp_path / "registry") as registry:
        push_image(registry.url, "library/app", "v1", image)
        conf = write_registries_conf(tmp_path / "registries.conf", NAME, registry.host)
        result = podman_pull(f"{NAME}/library/app:v1", registries_conf=conf, workdir=tmp_path / "p")
        assert image.config_digest.removeprefix("sha256:") in result.output
        assert_pulled_once_each(registry, image)


def test_registries_conf_endpoints(tmp_path: Path) -> None:
    conf = write_registries_conf(tmp_path / "r.conf", NAME, "127.0.0.1:5000", "127.0.0.1:65001")
    assert registry_endpoints(conf, f"{NAME}/app:v1") == ["127.0.0.1:65001", "127.0.0.1:5000"]
    with pytest.raises(HarnessError, match="does not map"):
        registry_endpoints(conf, "other.test/app:v1")


# -- auth --------------------------------------------------------------------------------------


def test_basic_auth_registry_refuses_anonymous_and_accepts_the_user(
    tmp_path: Path, image: Image
) -> None:
    ref = f"{NAME}/private/app:v1"
    auth = BasicAuth({ALICE[0]: ALICE[1]})
    with Registry(tmp_path / "registry", auth=auth) as registry:
        v2 = httpx.get(f"{registry.url}/v2/")
        assert v2.status_code == 401
        assert parse_challenge(v2.headers["WWW-Authenticate"])[0] == "basic"
        with pytest.raises(HarnessError, match="401"):
            push_image(registry.url, "private/app", "v1", image)
        with pytest.raises(HarnessError, match="401"):
            push_image(registry.url, "private/app", "v1", image, auth=(ALICE[0], "wrong"))
        push_image(registry.url, "private/app", "v1", image, auth=ALICE)

        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, NAME, registry.url)
        with Containerd(tmp_path / "ctd") as ctd:
            with pytest.raises(HarnessError, match=r"401|authoriz"):
                ctd.pull(ref, hosts_dir=hosts)
            ctd.pull(ref, hosts_dir=hosts, user=ALICE)
        assert_pulled_once_each(registry, image)

        conf = write_registries_conf(tmp_path / "registries.conf", NAME, registry.host)
        with pytest.raises(HarnessError, match=r"unauthorized|authentication required"):
            skopeo_copy(ref, registries_conf=conf, out_dir=tmp_path / "anon")
        skopeo_copy(ref, registries_conf=conf, out_dir=tmp_path / "alice", creds=ALICE)
        assert registry.blob_gets(image.layer_digests[0]) == 2


def test_token_auth_registry_authorised_push_and_pull_anonymous_refused(
    tmp_path: Path, image: Image
) -> None:
    token_server = TokenServer(
        tmp_path / "tokens",
        users={ALICE[0]: ALICE[1], "bob": "builder"},
        grants={ALICE[0]: {"private/*": ["pull", "push"]}, "bob": {"public/*": ["pull", "push"]}},
        anonymous={"public/*": ["pull"]},
    )
    with (
        token_server,
        Registry(tmp_path / "registry", auth=token_server.registry_auth()) as registry,
    ):
        challenge = httpx.get(f"{registry.url}/v2/").headers["WWW-Authenticate"]
        assert parse_challenge(challenge) == (
            "bearer",
            {"realm": token_server.realm, "service": token_server.service},
        )
        push_image(registry.url, "private/app", "v1", image, auth=ALICE)
        push_image(registry.url, "public/app", "v1", image, auth=("bob", "builder"))
        with pytest.raises(HarnessError, match="401"):  # alice may not push to public/
            push_image(registry.url, "public/app", "v2", image, auth=ALICE)

        hosts = tmp_path / "hosts"
        write_hosts_toml(hosts, NAME, registry.url)
        with Containerd(tmp_path / "ctd") as ctd:
            with pytest.raises(HarnessError, match="authoriz"):
                ctd.pull(f"{NAME}/private/app:v1", hosts_dir=hosts)
            with pytest.raises(HarnessError, match=r"401|authoriz"):
                ctd.pull(f"{NAME}/private/app:v1", hosts_dir=hosts, user=(ALICE[0], "bad"))
            ctd.pull(f"{NAME}/private/app:v1", hosts_dir=hosts, user=ALICE)
            assert_pulled_once_each(registry, image)
            ctd.reset()
            ctd.pull(f"{NAME}/public/app:v1", hosts_dir=hosts)  # anonymous, public: allowed
        assert registry.blob_gets(image.layer_digests[0]) == 2

        anonymous_private = [
            t
            for t in token_server.issued
            if t.account is None and t.requested[0].name == "private/app"
        ]
        assert anonymous_private
        assert all(a.actions == () for t in anonymous_private for a in t.granted)
        # containerd with a password uses the OAuth2 POST form first.
        assert any(t.method == "POST" and t.account == "alice" for t in token_server.issued)

        conf = write_registries_conf(tmp_path / "registries.conf", NAME, registry.host)
        with pytest.raises(HarnessError, match=r"denied|unauthorized"):
            skopeo_copy(f"{NAME}/private/app:v1", registries_conf=conf, out_dir=tmp_path / "a")
        skopeo_copy(
            f"{NAME}/private/app:v1", registries_conf=conf, out_dir=tmp_path / "b", creds=ALICE
        )


def test_token_server_signs_what_the_spec_says(tmp_path: Path) -> None:
    with TokenServer(
        tmp_path, users={"alice": "pw"}, grants={"alice": {"team/*": ["pull"]}}, ttl=60
    ) as server:
        query = {"service": server.service, "scope": "repository:team/app:pull,push"}
        response = httpx.get(server.realm, params=query, auth=("alice", "pw"))
        assert response.status_code == 200
        body = response.json()
        assert body["token"] == body["access_token"]
        assert body["expires_in"] == 60
        head_b64, claims_b64, sig_b64 = body["token"].split(".")

        def unb64(part: str) -> bytes:
            return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

        header = json.loads(unb64(head_b64))
        claims = json.loads(unb64(claims_b64))
        assert header["alg"] == "RS256"
        cert = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
        assert cert == x509.load_pem_x509_certificate(server.cert_path.read_bytes())
        public_key = cert.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(
            unb64(sig_b64), f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        assert claims["iss"] == server.issuer
        assert claims["aud"] == server.service
        assert claims["sub"] == "alice"
        assert claims["nbf"] <= claims["iat"] < claims["exp"] == claims["iat"] + 60
        assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]

        assert httpx.get(server.realm, params=query, auth=("alice", "no")).status_code == 401
        other = {**query, "service": "elsewhere"}
        assert httpx.get(server.realm, params=other, auth=("alice", "pw")).status_code == 400
        form = {**query, "grant_type": "password", "username": "alice", "password": "pw"}
        assert httpx.post(server.realm, data=form).status_code == 200
    assert parse_scope("repository:host:5000/app:pull").name == "host:5000/app"
    with pytest.raises(TokenRequestError, match="malformed"):
        parse_scope("repository")


def test_challenge_auth_answers_basic(tmp_path: Path) -> None:
    with Registry(tmp_path / "r", auth=BasicAuth({"u": "p"})) as registry:
        with httpx.Client(auth=ChallengeAuth(("u", "p"))) as client:
            assert client.get(f"{registry.url}/v2/").status_code == 200
        with httpx.Client(auth=ChallengeAuth(None)) as client:
            assert client.get(f"{registry.url}/v2/").status_code == 401


# -- processes ---------------------------------------------------------------------------------


def test_process_that_dies_reports_its_log_tail(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('boom: bad config'); raise SystemExit(3)"]
    with (
        Process("dying", argv, log_path=tmp_path / "log") as process,
        pytest.raises(HarnessError, match=r"exited with status 3(.|\n)*boom: bad config"),
    ):
        process.wait_ready(lambda: False, timeout=10, what="never")


def test_process_wait_is_bounded_and_stop_kills(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with Process("sleeper", argv, log_path=tmp_path / "log") as process:
        with pytest.raises(HarnessError, match=r"timed out after 0\.2 s"):
            process.wait_ready(lambda: False, timeout=0.2, what="never")
        assert process.running
    assert not process.running


def test_missing_binary_is_an_error_naming_the_package() -> None:
    with pytest.raises(MissingBinaryError, match="apt-get install"):
        require_binary("no-such-program-harness")
    for name in ("docker-registry", "containerd", "ctr", "skopeo", "podman"):
        require_binary(name)
