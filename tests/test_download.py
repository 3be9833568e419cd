"""Dataset download against a B2SHARE stand-in on 127.0.0.1: layout, resume, checksums, safety."""

import hashlib
import io
import json
import re
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

from sem_cls.data.archives import PARTIAL_SUFFIX
from sem_cls.data.download import download_dataset, download_from_config, record_files
from sem_cls.data.synthetic import CLASSES as KNOWN_CLASSES
from sem_cls.errors import UserError
from tests.helpers import ROOT, compose_config

CLASSES = ("Biological", "Fibres", "Tips")
RECORD_ID = "0123456789abcdef0123456789abcdef"


def class_tar(name: str, images: int = 3, members: dict[str, bytes] | None = None) -> bytes:
    """A tar as B2SHARE serves one class: `<Class>/L<k>_<32 hex>.jpg` (bytes, not real JPEGs)."""
    if members is None:
        members = {
            f"{name}/L{k}_{hashlib.md5(f'{name}{k}'.encode()).hexdigest()}.jpg": (
                hashlib.sha256(f"{name}{k}".encode()).digest() * 700  # ~22 KB
            )
            for k in range(images)
        }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member_name, data in members.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_contents(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


class FakeB2Share:
    """A record's metadata and files, with the faults a test asks for; every request is noted."""

    def __init__(self, files: dict[str, bytes], shape: str = "invenio_rdm"):
        self.files = files
        self.shape = shape  # invenio_rdm (files.entries, links.content) or b2share_v2 (bucket)
        self.checksums = {
            key: "md5:" + hashlib.md5(data).hexdigest() for key, data in files.items()
        }
        self.cut_after: dict[str, int] = {}  # key -> bytes sent before the connection drops
        self.cut_every_time = False
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.base_url = ""

    def record(self) -> dict:
        entries = [
            {"key": key, "size": len(data), "checksum": self.checksums[key]}
            for key, data in self.files.items()
        ]
        if self.shape == "b2share_v2":
            files = [entry | {"bucket": "b0bd6602"} for entry in entries]
        else:
            files = {"enabled": True, "entries": {entry["key"]: entry for entry in entries}}
            for entry in entries:
                url = f"{self.base_url}/api/records/{RECORD_ID}/files/{entry['key']}/content"
                entry["links"] = {"content": url}
        return {"id": RECORD_ID, "files": files, "links": {}}

    def file_requests(self, key: str) -> list[str | None]:
        return [rng for path, rng in self.requests if key in path]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet: pytest shows failures
        pass

    def do_GET(self):
        fake: FakeB2Share = self.server.fake
        fake.requests.append((self.path, self.headers.get("Range")))
        path = unquote(urlsplit(self.path).path)
        if path == f"/api/records/{RECORD_ID}":
            body = json.dumps(fake.record()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        match = re.fullmatch(r"/api/files/[^/]+/(.+)|/api/records/[^/]+/files/(.+)/content", path)
        key = match and (match[1] or match[2])
        if key not in fake.files:
            self.send_error(404)
            return
        self.send_file(fake, key)

    def send_file(self, fake: FakeB2Share, key: str):
        data, start = fake.files[key], 0
        byte_range = self.headers.get("Range")
        if byte_range and not fake.ignore_range:  # Range: bytes=<start>-
            start = int(re.fullmatch(r"bytes=(\d+)-", byte_range)[1])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = fake.cut_after.get(key) if fake.cut_every_time else fake.cut_after.pop(key, None)
        if cut is not None:  # send part of it, then drop the connection
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def serve(monkeypatch):
    """Start a FakeB2Share for some files on a free port of 127.0.0.1."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never through a configured proxy
    servers = []

    def start(files: dict[str, bytes], shape: str = "invenio_rdm") -> FakeB2Share:
        fake = FakeB2Share(files, shape)
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.fake = fake
        fake.base_url = f"http://127.0.0.1:{server.server_port}"
        # A short poll interval: shutdown() waits for one, and every test stops a server.
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tars() -> dict[str, bytes]:
    return {f"{name}.tar": class_tar(name) for name in CLASSES}


def fetch(fake: FakeB2Share, target: Path, names=None, **kwargs):
    kwargs = {"retries": 0, "retry_wait_s": 0, "timeout_s": 5} | kwargs
    return download_dataset(
        RECORD_ID, list(names or fake.files), target, base_url=fake.base_url, **kwargs
    )


def assert_unpacked(target: Path, tars: dict[str, bytes]) -> None:
    for data in tars.values():
        for member, content in tar_contents(data).items():
            assert (target / member).read_bytes() == content
    assert sorted(p.name for p in target.iterdir()) == sorted(k.removesuffix(".tar") for k in tars)


@pytest.mark.parametrize("shape", ["invenio_rdm", "b2share_v2"])
def test_download_unpacks_each_class_into_its_folder(serve, tars, tmp_path, shape):
    fake = serve(tars, shape)
    class_dirs = fetch(fake, tmp_path / "data" / "nffa")
    assert class_dirs == {name: tmp_path / "data" / "nffa" / name for name in CLASSES}
    assert_unpacked(tmp_path / "data" / "nffa", tars)  # nothing else: no .part, no .download


def test_dropped_connection_is_resumed_with_a_range_request(serve, tars, tmp_path):
    fake = serve(tars)
    fake.cut_after["Fibres.tar"] = 10_000
    fetch(fake, tmp_path / "nffa", retries=1)
    assert fake.file_requests("Fibres.tar") == [None, "bytes=10000-"]
    assert_unpacked(tmp_path / "nffa", tars)


def test_part_file_of_an_earlier_run_is_resumed(serve, tars, tmp_path):
    fake = serve(tars)
    part = tmp_path / "nffa" / ".download" / "Tips.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(tars["Tips.tar"][:12_345])
    fetch(fake, tmp_path / "nffa")
    assert fake.file_requests("Tips.tar") == ["bytes=12345-"]
    assert_unpacked(tmp_path / "nffa", tars)


def test_server_ignoring_range_restarts_the_file_cleanly(serve, tars, tmp_path):
    fake = serve(tars)
    fake.ignore_range = True
    part = tmp_path / "nffa" / ".download" / "Tips.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"not the start of Tips.tar" * 100)
    fetch(fake, tmp_path / "nffa")
    assert fake.file_requests("Tips.tar") == ["bytes=2500-"]  # answered 200, written from byte 0
    assert_unpacked(tmp_path / "nffa", tars)


def test_network_failure_names_the_url_and_keeps_what_arrived(serve, tars, tmp_path):
    fake = serve(tars)
    fake.cut_after["Fibres.tar"], fake.cut_every_time = 10_000, True
    with pytest.raises(UserError, match=r"Fibres\.tar.*failed.*run the same command again"):
        fetch(fake, tmp_path / "nffa", names=["Fibres.tar"], retries=2)
    assert fake.file_requests("Fibres.tar") == [None, "bytes=10000-", "bytes=20000-"]
    assert (tmp_path / "nffa" / ".download" / "Fibres.tar.part").stat().st_size == 30_000
    assert not (tmp_path / "nffa" / "Fibres").exists()


def test_checksum_mismatch_deletes_the_file_and_says_what_to_do(serve, tars, tmp_path):
    fake = serve(tars)
    fake.checksums["Tips.tar"] = "md5:" + "0" * 32
    actual = hashlib.md5(tars["Tips.tar"]).hexdigest()
    with pytest.raises(UserError) as error:
        fetch(fake, tmp_path / "nffa", names=["Tips.tar"])
    message = str(error.value)
    assert "Tips.tar" in message and "0" * 32 in message and actual in message
    assert "deleted" in message and "run the same command again" in message
    assert not list((tmp_path / "nffa" / ".download").iterdir())
    assert not (tmp_path / "nffa" / "Tips").exists()


def test_rerun_fetches_only_missing_classes(serve, tars, tmp_path):
    fake = serve(tars)
    fetch(fake, tmp_path / "nffa")
    fake.requests.clear()
    fetch(fake, tmp_path / "nffa")
    assert fake.requests == []  # complete: not even the record is asked for

    (tmp_path / "nffa" / "Fibres" / "stray.txt").write_text("a file of the user's")
    for path in (tmp_path / "nffa" / "Tips").iterdir():
        path.unlink()
    (tmp_path / "nffa" / "Tips").rmdir()
    fetch(fake, tmp_path / "nffa")
    assert [path for path, _ in fake.requests if "files" in path] == [
        f"/api/records/{RECORD_ID}/files/Tips.tar/content"
    ]
    assert (tmp_path / "nffa" / "Fibres" / "stray.txt").exists()


@pytest.mark.parametrize("member", ["Biological/../../evil.jpg", "/tmp/evil.jpg"])
def test_tar_with_a_path_outside_its_folder_is_refused(serve, tmp_path, member):
    fake = serve({"Biological.tar": class_tar("Biological", members={member: b"x"})})
    with pytest.raises(UserError, match=re.escape(repr(member))):
        fetch(fake, tmp_path / "data" / "nffa")
    assert not (tmp_path / "data" / "nffa" / "Biological").exists()
    assert not list(tmp_path.rglob("evil.jpg"))
    assert not list((tmp_path / "data" / "nffa").glob(".*.partial"))


def test_too_little_disk_space_stops_before_downloading(serve, tars, tmp_path, monkeypatch):
    fake = serve(tars)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(UserError, match=r"needs about 0\.0 GB free .* has 0\.0 GB"):
        fetch(fake, tmp_path / "nffa")
    assert fake.file_requests(".tar") == []


def test_record_without_a_file_or_record_lists_what_there_is(serve, tars, tmp_path):
    fake = serve(tars)
    with pytest.raises(UserError, match=r"lists no Powder\.tar; it lists Biological\.tar"):
        fetch(fake, tmp_path / "nffa", names=["Powder.tar"])
    with pytest.raises(UserError, match=r"404.*download\.record_id="):
        download_dataset("moved", ["Tips.tar"], tmp_path / "nffa", base_url=fake.base_url)


def test_record_files_reads_both_b2share_shapes():
    v2 = {"files": [{"key": "Tips.tar", "size": 3, "checksum": "md5:ab", "bucket": "b1"}]}
    rdm = {"files": {"entries": {"Tips.tar": {"key": "Tips.tar", "links": {"content": "u"}}}}}
    listing = {
        "contents": [{"key": "Tips.tar", "links": {"self": "https://h/api/files/b/Tips.tar"}}]
    }
    assert record_files(v2, "https://h", "r")["Tips.tar"].url == "https://h/api/files/b1/Tips.tar"
    assert record_files(v2, "https://h", "r")["Tips.tar"].checksum == "md5:ab"
    assert record_files(rdm, "https://h", "r")["Tips.tar"].url == "u"
    assert record_files(listing, "https://h", "r")["Tips.tar"].url.endswith("/b/Tips.tar")


def variants() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "download").glob("*.yaml"))


@pytest.mark.parametrize("variant", variants())
def test_variant_config_composes(variant, tmp_path):
    cfg = compose_config("download", tmp_path, [f"download={variant}"])
    assert Path(cfg.target_dir) == ROOT / "data" / variant
    # One archive per class the project knows: a variant that left one out would train on nine.
    assert sorted(f.removesuffix(".tar") for f in cfg.download.files) == sorted(KNOWN_CLASSES)


def test_default_variant_lands_where_training_reads(serve, tars, tmp_path):
    train = compose_config("train", tmp_path)
    fake = serve(tars)
    overrides = [
        f"paths.data_dir={tmp_path / 'data'}",
        f"download.base_url={fake.base_url}",
        f"download.record_id={RECORD_ID}",
        f"download.files=[{','.join(tars)}]",
        "retry_wait_s=0",
    ]
    cfg = compose_config("download", tmp_path, overrides)
    assert Path(cfg.target_dir).name == Path(train.data.data_dir).name == "nffa"
    download_from_config(cfg)
    assert_unpacked(tmp_path / "data" / "nffa", tars)


def test_only_unpacking_folders_of_a_killed_run_are_cleared(serve, tars, tmp_path):
    target = tmp_path / "nffa"
    stale = target / f".Tips.k3j9x_0q{PARTIAL_SUFFIX}"  # as extract_class's mkdtemp names it
    (stale / "Tips").mkdir(parents=True)
    mine = target / f".my_notes{PARTIAL_SUFFIX}"
    mine.mkdir()
    (mine / "draft.txt").write_text("a folder of the user's")
    fetch(serve(tars), target)
    assert not stale.exists()
    assert (mine / "draft.txt").read_text() == "a folder of the user's"
