"""atlas_jax/storage.py against a real Cloud Storage server (fake-gcs-server, tests/gcs_server.py) and the
local disk: the same calls, the same answers; the one-line errors for a missing bucket, refused
credentials (401), no permission (403), no credentials, and a storage that does not answer."""

import http.server
import subprocess
import sys
import threading
import time

import pytest

from atlas_jax import metrics as metrics_lib
from atlas_jax import storage
from atlas_jax import workdir as workdir_lib
from tests.train_configs import ROOT, tiny_config


@pytest.fixture(params=['local', 'gs'])
def base(request, tmp_path):
  if request.param == 'local':
    return tmp_path / 'base'
  return request.getfixturevalue('gcs_dir')


def test_files_and_directories_behave_alike_locally_and_on_gcs(base):
  top = storage.join(base, 'top')
  storage.makedirs(top)
  assert not storage.isfile(top / 'a.txt') and not storage.exists(top / 'a.txt')
  storage.write_text(top / 'a.txt', 'one\n')
  storage.write_bytes(top / 'sub' / 'b.bin', b'\0\1')
  assert storage.read_text(top / 'a.txt') == 'one\n'
  assert storage.read_bytes(top / 'sub' / 'b.bin') == b'\0\1'
  assert storage.isfile(top / 'a.txt') and not storage.isdir(top / 'a.txt')
  assert storage.isdir(top / 'sub') and not storage.isfile(top / 'sub') and storage.exists(top / 'sub')
  assert storage.listdir(top) == ['a.txt', 'sub']
  storage.write_text(top / 'a.txt', 'two\n')  # replaced whole
  assert storage.read_text(top / 'a.txt') == 'two\n'
  # Create-if-absent: exactly one of two creators wins, and the winner's content stays.
  assert storage.create_if_absent(top / 'lock', b'first') is True
  assert storage.create_if_absent(top / 'lock', b'second') is False
  assert storage.read_bytes(top / 'lock') == b'first'
  storage.replace(top / 'a.txt', top / 'c.txt')
  assert storage.listdir(top) == ['c.txt', 'lock', 'sub'] and storage.read_text(top / 'c.txt') == 'two\n'
  storage.remove(top / 'lock')
  storage.remove(top / 'lock', missing_ok=True)
  with pytest.raises(FileNotFoundError):
    storage.remove(top / 'lock')
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(top / 'lock')
  storage.rmtree(top)
  assert not storage.exists(top / 'c.txt') and not storage.isdir(top / 'sub')


def test_config_labels_and_metrics_round_trip_on_gcs(gcs_dir):
  config = tiny_config()
  workdir_lib.write_config(gcs_dir, config)
  assert workdir_lib.read_config(gcs_dir).to_dict() == workdir_lib.read_config(gcs_dir).to_dict()
  assert workdir_lib.read_config(gcs_dir).image_size == (32, 32)
  workdir_lib.write_labels(gcs_dir, ['cat', 'dog'])
  assert workdir_lib.read_labels(gcs_dir) == ['cat', 'dog']
  with metrics_lib.MetricWriter(gcs_dir) as writer:
    for step in (1, 2, 3):
      writer.write(step, 'train', {'loss': float(step)})
    writer.sync()  # what a checkpoint does: the object holds every record so far
    assert [record['step'] for record in metrics_lib.read_metrics(gcs_dir)] == [1, 2, 3]
    writer.write(4, 'train', {'loss': 4.0})
  # A resumed run from step 2 (a new writer) drops the records past it and appends its own.
  with metrics_lib.MetricWriter(gcs_dir) as writer:
    writer.truncate_after(2)
    writer.write(3, 'train', {'loss': 30.0})
  records = metrics_lib.read_metrics(gcs_dir)
  assert [(record['step'], record['loss']) for record in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  events = storage.listdir(metrics_lib.tensorboard_dir(gcs_dir))
  assert len(events) == 2 and all(name.startswith('events.out.tfevents.') for name in events)


def test_a_missing_bucket_is_one_line(gcs_server):
  with pytest.raises(storage.StorageError, match=r'^bucket gs://no-such-bucket does not exist'):
    storage.write_text('gs://no-such-bucket/run/config.json', '{}')
  with pytest.raises(storage.StorageError, match='does not exist'):
    storage.read_text('gs://no-such-bucket/run/config.json')


class _Refusing(http.server.BaseHTTPRequestHandler):
  """Answers every request with one status, as Cloud Storage does for bad or missing rights."""

  status = 401

  def _answer(self):
    body = b'{"error": {"code": %d, "message": "refused by the test"}}' % self.status
    self.send_response(self.status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

  def log_message(self, *args):
    pass


@pytest.mark.parametrize(
  'status, expected', [(401, 'refused the credentials (401)'), (403, 'no permission (403) on bucket')]
)
def test_refused_credentials_and_no_permission_are_one_line_from_the_command_line(tmp_path, status, expected):
  handler = type('Handler', (_Refusing,), {'status': status})
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f'http://127.0.0.1:{server.server_address[1]}'
  try:
    result = _predict_on('gs://test-bucket/run', {'STORAGE_EMULATOR_HOST': url}, tmp_path)
  finally:
    server.shutdown()
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr[-2000:]
  assert lines[-1].startswith('error: ') and expected in lines[-1], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_no_credentials_is_one_line_from_the_command_line(tmp_path):
  environment = {
    'STORAGE_EMULATOR_HOST': '',
    'GOOGLE_APPLICATION_CREDENTIALS': str(tmp_path / 'no-such-key.json'),
    'NO_GCE_CHECK': 'True',
  }
  result = _predict_on('gs://test-bucket/run', environment, tmp_path)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr[-2000:]
  assert lines[-1].startswith('error: ') and 'credentials' in lines[-1], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def _predict_on(workdir, environment, tmp_path):
  image = tmp_path / 'image.png'
  from PIL import Image

  Image.new('RGB', (8, 8)).save(image)
  import os

  env = {**os.environ, 'PYTHONPATH': str(ROOT), **environment}
  env = {name: value for name, value in env.items() if value != ''}
  return subprocess.run(
    [sys.executable, '-m', 'atlas_jax.predict', f'--checkpoint={workdir}', str(image)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_a_storage_that_does_not_answer_is_one_line_within_the_retry_budget(gcs_server, gcs_dir):
  storage.write_text(f'{gcs_dir}/x.txt', 'x')
  previous = storage.policy()
  storage.configure(timeout_s=2, retry_s=3)
  gcs_server.stop()
  try:
    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match='did not answer within the retry budget of 3 s'):
      storage.read_text(f'{gcs_dir}/x.txt')
    elapsed = time.monotonic() - start
    # Within the budget, one request's timeout and one backoff. No lower bound: the client's backoff is
    # jittered (each sleep uniform up to its delay), so how soon it stops short of the budget varies (0.98 s
    # once, 2026-12-02).
    assert elapsed < 3 + 2 + 8
  finally:
    storage.configure(timeout_s=previous.timeout_s, retry_s=previous.retry_s)
    gcs_server.start()
  assert storage.read_text(f'{gcs_dir}/x.txt') == 'x'  # the filesystem backend kept the object


def test_gs_paths_without_the_clients_name_the_extra_to_install(tmp_path):
  blocker = tmp_path / 'site'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text("import sys\nsys.modules['google.cloud.storage'] = None\n")
  code = 'from atlas_jax import storage\ntry:\n  storage.read_text("gs://b/x")\nexcept storage.StorageError as e:\n  print(e)\n'
  import os

  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(blocker), str(ROOT)])}
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60)
  assert "pip install 'atlas_jax[gcs]'" in result.stdout, result.stderr[-2000:]
  assert storage.is_remote('gs://b/x') and not storage.is_remote(tmp_path)


def test_a_class_list_on_gcs_reads_as_a_local_one(gcs_dir, tmp_path):
  from atlas_jax.data import sources

  text = 'n02\n# a comment\nn01  # the first\n\n'
  storage.write_text(f'{gcs_dir}/classes.txt', text)
  (tmp_path / 'classes.txt').write_text(text)
  assert sources.read_class_list(f'{gcs_dir}/classes.txt') == sources.read_class_list(
    tmp_path / 'classes.txt'
  )
  assert sources.read_class_list(f'{gcs_dir}/classes.txt') == ['n01', 'n02']
  with pytest.raises(sources.DataSourceError, match='is not a file'):
    sources.read_class_list(f'{gcs_dir}/missing.txt')
