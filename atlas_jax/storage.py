"""Where the project reads and writes: a local path or a Cloud Storage object (`gs://bucket/name`).

Every file operation of the project goes through this module. A local path behaves exactly as a
`pathlib.Path` does (atomic writes through a temporary file renamed over the target); a `gs://` path goes
through `google-cloud-storage` (the optional extra `atlas_jax[gcs]`, imported at the first `gs://` use,
with one line saying what to install when it is missing). orbax writes and lists checkpoints through
`etils.epath` (gcsfs for `gs://`) and tensorstore, which speak Cloud Storage themselves; `path()` gives the
`etils.epath.Path` to hand them, and `configure_tensorstore()` bounds tensorstore's retries.

Object storage has no directories, no appends and no rename: a "directory" is a name prefix, `write_*`
uploads a whole object (an upload is atomic: readers see the old object or the new one), `replace` copies
and deletes, `create_if_absent` uploads with the precondition `ifGenerationMatch=0` (locally: `O_EXCL`).
Data read at random (tfds shards) is copied whole into a local cache once per machine (`local_copy`,
$ATLAS_JAX_GCS_CACHE) and read from there.

Bounded retries and timeouts (the policy, `Policy`): each request waits at most `timeout_s` for an answer,
and a request that fails transiently (connection refused or reset, 408, 429, 5xx) is retried with
exponential backoff until `retry_s` have passed; then one `StorageUnavailable` line says so. The defaults
come from the environment (`ATLAS_JAX_STORAGE_TIMEOUT_S`, 60; `ATLAS_JAX_STORAGE_RETRY_S`, 120) and
`configure()` changes them. No credentials, refused credentials (401), no permission (403) and a missing
bucket are each one `StorageError` line.

The clients honour the emulator variables: `STORAGE_EMULATOR_HOST` (google-cloud-storage, gcsfs),
`TENSORSTORE_GCS_HTTP_URL` with `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore) and
`CLOUD_STORAGE_EMULATOR_ENDPOINT` (google-cloud-cpp, which array_record uses).
"""

import dataclasses
import errno
import logging
import os
import pathlib
import shutil
import threading
import time
from typing import Any, Callable

from atlas_jax.errors import AtlasError

PREFIX = 'gs://'
INSTALL_HINT = "pip install 'atlas_jax[gcs]'"


class StorageError(AtlasError, OSError):
  """A storage call that cannot succeed as configured: no client library, no credentials, no permission,
  a missing bucket."""


class StorageUnavailable(StorageError):
  """The storage did not answer within the retry budget (`retry_s`)."""


@dataclasses.dataclass(frozen=True)
class Policy:
  timeout_s: float  # the longest one request waits for an answer
  retry_s: float  # the longest a call keeps retrying transient failures, then StorageUnavailable
  initial_delay_s: float = 0.5  # the first backoff; each next one doubles, up to max_delay_s
  max_delay_s: float = 8.0

  def tensorstore_retries(self) -> int:
    """The number of tensorstore retries whose backoff (initial_delay_s doubling up to max_delay_s) fits
    in retry_s."""
    total, delay, count = 0.0, self.initial_delay_s, 0
    while total + delay <= self.retry_s and count < 64:
      total += delay
      delay = min(2 * delay, self.max_delay_s)
      count += 1
    return max(count, 1)


def _env_float(name: str, default: float) -> float:
  value = os.environ.get(name)
  if value is None or not value.strip():
    return default
  try:
    number = float(value)
  except ValueError:
    raise StorageError(f'{name}={value!r} is not a number of seconds') from None
  if number <= 0:
    raise StorageError(f'{name}={value!r} must be positive')
  return number


_policy: Policy | None = None


def policy() -> Policy:
  global _policy
  if _policy is None:
    _policy = Policy(
      timeout_s=_env_float('ATLAS_JAX_STORAGE_TIMEOUT_S', 60.0),
      retry_s=_env_float('ATLAS_JAX_STORAGE_RETRY_S', 120.0),
    )
  return _policy


def configure(timeout_s: float | None = None, retry_s: float | None = None) -> Policy:
  """Sets the retry and timeout policy of every later storage call (tensorstore included); returns it."""
  global _policy
  current = policy()
  _policy = dataclasses.replace(
    current,
    timeout_s=current.timeout_s if timeout_s is None else float(timeout_s),
    retry_s=current.retry_s if retry_s is None else float(retry_s),
  )
  if _policy.timeout_s <= 0 or _policy.retry_s <= 0:
    raise StorageError(f'storage timeouts must be positive, got {_policy}')
  configure_tensorstore()
  return _policy


# ----------------------------------------------------------------------------------------------------------
# Names.


def is_remote(path) -> bool:
  return str(path).startswith(PREFIX)


def split(path) -> tuple[str, str]:
  """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
  rest = str(path)[len(PREFIX) :]
  bucket, _, name = rest.partition('/')
  if not bucket:
    raise StorageError(f'{path} names no bucket: write gs://BUCKET/PATH')
  return bucket, name.strip('/')


def path(location):
  """A local `pathlib.Path` or, for gs://, an `etils.epath.Path` (for orbax, and for joining names with
  `/`); both print as the location given."""
  if is_remote(location):
    _require_clients()
    from etils import epath

    return epath.Path(str(location))
  return pathlib.Path(location)


def expand(location) -> str:
  """The location as a string for a library that takes one: a local path with `~` expanded; a gs:// one as
  given, once the clients it needs are known to be installed (JAX's persistent compilation cache reads and
  writes a gs:// directory through etils.epath, that is gcsfs)."""
  if is_remote(location):
    _require_clients()
    return str(location)
  return os.path.expanduser(str(location))


def join(base, *parts):
  """`path(base) / part / ...`."""
  result = path(base)
  for part in parts:
    result = result / str(part)
  return result


# ----------------------------------------------------------------------------------------------------------
# The Cloud Storage client.

_lock = threading.Lock()
_client = None


def _require_clients():
  try:
    import gcsfs  # noqa: F401  (etils.epath's backend for gs://, which orbax uses)
    from google.cloud import storage  # noqa: F401
  except ImportError as error:
    raise StorageError(
      f'gs:// paths need the Cloud Storage clients ({error.name} is missing): {INSTALL_HINT}'
    ) from None
  # gcsfs would otherwise ask the storage-control API for every bucket's layout (a gRPC call that needs
  # credentials and fails against an emulator); plain buckets are what the project uses.
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  # gcsfs logs a traceback for every request it gives up on; the StorageError line says it once.
  logging.getLogger('gcsfs').setLevel(logging.CRITICAL)
  _bound_gcsfs_retries()
  configure_tensorstore()


# gcsfs's methods that retry (its `retry_request` decorator: six tries, a backoff of 1, 2, 4, 8, 16 s).
_GCSFS_RETRYING = ('_request', '_get_file_request', '_get_file_concurrent')


def _bound_gcsfs_retries() -> None:
  """gcsfs retries each request six times with a backoff of its own, about 35 s in all, and lets no one
  configure it; so an outage took that long on top of the policy's budget wherever orbax goes through gcsfs.
  Its retrying methods keep the undecorated request as `__wrapped__`: they are wrapped again here to retry
  what gcsfs counts as transient within the policy's budget (`retry_s`), with the policy's backoff. A gcsfs
  whose methods are built otherwise keeps its own retries."""
  import gcsfs

  # On the class that defines each (gcsfs.GCSFileSystem may be a subclass that delegates to its parent's).
  for klass in gcsfs.GCSFileSystem.__mro__:
    for name in _GCSFS_RETRYING:
      method = vars(klass).get(name)
      undecorated = getattr(method, '__wrapped__', None)
      if undecorated is not None and not getattr(method, 'bounded_by_policy', False):
        setattr(klass, name, _within_budget(undecorated))


def _within_budget(undecorated):
  import asyncio
  import functools

  @functools.wraps(undecorated)
  async def request(*args, **kwargs):
    p = policy()
    deadline = time.monotonic() + p.retry_s
    delay = p.initial_delay_s
    while True:
      try:
        return await undecorated(*args, **kwargs)
      except Exception as error:
        if not _gcsfs_transient(error) or time.monotonic() + delay > deadline:
          raise
      await asyncio.sleep(delay)
      delay = min(2 * delay, p.max_delay_s)

  request.bounded_by_policy = True
  return request


def _gcsfs_transient(error) -> bool:
  """What gcsfs's own decorator retries: its HTTP, checksum, auth and connection errors that
  `gcsfs.retry.is_retriable` calls transient (a 404 never is)."""
  import aiohttp.client_exceptions
  from gcsfs import retry as gcsfs_retry
  import google.auth.exceptions
  import requests

  retried = (
    gcsfs_retry.HttpError,
    gcsfs_retry.ChecksumError,
    requests.exceptions.RequestException,
    google.auth.exceptions.GoogleAuthError,
    aiohttp.client_exceptions.ClientError,
  )
  if not isinstance(error, retried):
    return False
  if getattr(error, 'code', None) == 404 or getattr(error, 'status', None) == 404:
    return False
  return gcsfs_retry.is_retriable(error)


def _gcs_client():
  global _client
  with _lock:
    if _client is None:
      _require_clients()
      from google.cloud import storage

      if os.environ.get('STORAGE_EMULATOR_HOST'):
        _client = storage.Client.create_anonymous_client()
      else:
        import google.auth.exceptions

        try:
          _client = storage.Client()
        except google.auth.exceptions.DefaultCredentialsError:
          raise StorageError(
            'no Google Cloud credentials for gs:// paths: run `gcloud auth application-default login`, '
            "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (on Cloud TPU the VM's "
            'service account is found by itself)'
          ) from None
    return _client


def _retry():
  from google.api_core import retry as retry_lib

  p = policy()
  return retry_lib.Retry(
    predicate=_transient,
    initial=p.initial_delay_s,
    maximum=p.max_delay_s,
    multiplier=2.0,
    timeout=p.retry_s,
  )


def _call(location, operation: str, function: Callable[..., Any], *, missing_ok: bool = False):
  """Runs `function(retry=..., timeout=...)` and turns the client's exceptions into one-line errors."""
  from google.api_core import exceptions
  import google.auth.exceptions

  p = policy()
  bucket, _ = split(location)
  try:
    return function(retry=_retry(), timeout=p.timeout_s)
  except exceptions.NotFound:
    if missing_ok:
      raise
    raise _missing(location, bucket) from None
  except (exceptions.Unauthorized, google.auth.exceptions.InvalidOperation):
    # InvalidOperation: a 401 to a client without credentials to refresh (an emulator's anonymous one)
    raise StorageError(
      f'{operation} {location}: the storage refused the credentials (401): refresh them with '
      '`gcloud auth application-default login` or check GOOGLE_APPLICATION_CREDENTIALS'
    ) from None
  except exceptions.Forbidden:
    raise StorageError(
      f'{operation} {location}: no permission (403) on bucket gs://{bucket}: give the account roles/'
      'storage.objectAdmin there (reading alone needs roles/storage.objectViewer)'
    ) from None
  except google.auth.exceptions.DefaultCredentialsError:
    raise StorageError(
      f'{operation} {location}: no Google Cloud credentials: run `gcloud auth application-default login` '
      'or set GOOGLE_APPLICATION_CREDENTIALS'
    ) from None
  except google.auth.exceptions.RefreshError as error:
    raise StorageError(f'{operation} {location}: the credentials could not be refreshed ({error})') from None
  except (exceptions.RetryError, exceptions.GoogleAPICallError, ConnectionError, OSError) as error:
    if isinstance(error, exceptions.PreconditionFailed):
      raise
    if isinstance(error, exceptions.GoogleAPICallError) and not _transient(error):
      raise StorageError(f'{operation} {location}: {error}') from None
    raise unavailable(location, operation, error) from None
  except Exception as error:  # requests' and urllib3's connection errors, the timeouts
    if type(error).__module__.split('.')[0] in ('requests', 'urllib3'):
      raise unavailable(location, operation, error) from None
    raise


def _transient(error) -> bool:
  """The client's own transient errors (408, 429, 5xx, connection errors), and a connection dropped in the
  middle of an answer (a server going away), which the client does not retry by itself."""
  from google.cloud.storage import retry as storage_retry
  import requests

  if storage_retry.DEFAULT_RETRY._predicate(error):
    return True
  return isinstance(error, (ConnectionError, TimeoutError, requests.exceptions.RequestException))


def unavailable(location, operation: str, error: BaseException | None = None) -> StorageUnavailable:
  p = policy()
  cause = str(getattr(error, 'cause', None) or error or '').splitlines()
  reason = f' (last error: {cause[0][:160]})' if cause and cause[0] else ''
  return StorageUnavailable(
    f'{operation} {location}: the storage did not answer within the retry budget of {p.retry_s:g} s '
    f'(ATLAS_JAX_STORAGE_RETRY_S; each request {p.timeout_s:g} s, ATLAS_JAX_STORAGE_TIMEOUT_S){reason}'
  )


def _missing(location, bucket: str) -> BaseException:
  client = _gcs_client()
  try:
    exists = client.bucket(bucket).exists(retry=_retry(), timeout=policy().timeout_s)
  except Exception:
    exists = True  # cannot tell: report the object
  if not exists:
    return StorageError(f'bucket gs://{bucket} does not exist (for {location}): create it or fix the path')
  return FileNotFoundError(errno.ENOENT, 'no such object', str(location))


def _blob(location):
  bucket, name = split(location)
  return _gcs_client().bucket(bucket).blob(name)


# ----------------------------------------------------------------------------------------------------------
# Files.


def read_bytes(location) -> bytes:
  if not is_remote(location):
    return path(location).read_bytes()
  blob = _blob(location)
  return _call(location, 'reading', lambda **kw: blob.download_as_bytes(**kw))


def read_text(location, encoding: str = 'utf-8') -> str:
  return read_bytes(location).decode(encoding)


def write_bytes(location, data: bytes) -> None:
  """Writes the whole file atomically: readers see the old content or the new, never a part."""
  if not is_remote(location):
    target = path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f'.{target.name}.{os.getpid()}.tmp')
    try:
      with open(temporary, 'wb') as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
      os.replace(temporary, target)
    finally:
      if temporary.exists():
        temporary.unlink()
    return
  blob = _blob(location)
  _call(location, 'writing', lambda **kw: blob.upload_from_string(bytes(data), **kw))


def write_text(location, text: str, encoding: str = 'utf-8') -> None:
  write_bytes(location, text.encode(encoding))


def create_if_absent(location, data: bytes) -> bool:
  """Creates the file with `data` if no file of that name exists, atomically; True when this call created
  it, False when it existed (another process won). On gs:// the precondition ifGenerationMatch=0."""
  if not is_remote(location):
    target = path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
      descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      return False
    try:
      with os.fdopen(descriptor, 'wb') as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    except BaseException:
      target.unlink(missing_ok=True)  # a full disk: no empty file left behind for others to read
      raise
    return True
  from google.api_core import exceptions

  blob = _blob(location)
  try:
    _call(
      location, 'creating', lambda **kw: blob.upload_from_string(bytes(data), if_generation_match=0, **kw)
    )
  except exceptions.PreconditionFailed:
    return False
  return True


def exists(location) -> bool:
  """True for a file and for a directory (on gs://: a name prefix with objects under it)."""
  return isfile(location) or isdir(location)


def isfile(location) -> bool:
  if not is_remote(location):
    return path(location).is_file()
  blob = _blob(location)
  if not split(location)[1]:
    return False
  return bool(_call(location, 'looking up', lambda **kw: blob.exists(**kw)))


def isdir(location) -> bool:
  if not is_remote(location):
    return path(location).is_dir()
  bucket, name = split(location)
  if not name:
    return bool(_call(location, 'looking up', lambda **kw: _gcs_client().bucket(bucket).exists(**kw)))
  return bool(_list(location, max_results=1, delimiter=False)[0])


def _list(location, max_results: int | None = None, delimiter: bool = True) -> tuple[list[str], list[str]]:
  """(object names, sub-prefixes) directly under `location` on gs://, both relative to it."""
  bucket, name = split(location)
  prefix = f'{name}/' if name else ''

  def listing(**kw):
    pages = _gcs_client().list_blobs(
      bucket, prefix=prefix, delimiter='/' if delimiter else None, max_results=max_results, **kw
    )
    files = [blob.name[len(prefix) :] for blob in pages]  # consumes the pages, then the prefixes are known
    folders = [folder[len(prefix) :].rstrip('/') for folder in pages.prefixes]
    return files, folders

  return _call(location, 'listing', listing)


def listdir(location) -> list[str]:
  """The sorted names of the files and directories directly under `location`."""
  if not is_remote(location):
    return sorted(os.listdir(path(location)))
  files, folders = _list(location)
  return sorted({name for name in files + folders if name})


def makedirs(location) -> None:
  """Creates a local directory and its parents; on gs:// nothing (directories are name prefixes)."""
  if not is_remote(location):
    path(location).mkdir(parents=True, exist_ok=True)


def remove(location, missing_ok: bool = False) -> None:
  if not is_remote(location):
    path(location).unlink(missing_ok=missing_ok)
    return
  from google.api_core import exceptions

  blob = _blob(location)
  try:
    _call(location, 'deleting', lambda **kw: blob.delete(**kw), missing_ok=True)
  except exceptions.NotFound:
    if not missing_ok:
      raise FileNotFoundError(errno.ENOENT, 'no such object', str(location)) from None


def rmtree(location) -> None:
  """Removes a directory and everything under it (on gs://: every object under the prefix)."""
  if not is_remote(location):
    shutil.rmtree(path(location), ignore_errors=False)
    return
  from google.api_core import exceptions

  bucket, name = split(location)
  files, _ = _list(location, delimiter=False)
  for file in files:
    blob = _gcs_client().bucket(bucket).blob(f'{name}/{file}' if name else file)
    try:
      _call(location, 'deleting', lambda **kw: blob.delete(**kw), missing_ok=True)
    except exceptions.NotFound:
      pass  # deleted by another process meanwhile


def move_tree(source, target) -> None:
  """Moves the directory `source` to `target`, which must not exist (on gs://: each object under the prefix
  copied server-side, then deleted)."""
  if not is_remote(source) and not is_remote(target):
    os.rename(path(source), path(target))
    return
  source_bucket, source_name = split(source)
  target_bucket, target_name = split(target)
  client = _gcs_client()
  files, _ = _list(source, delimiter=False)
  for file in files:
    blob = client.bucket(source_bucket).blob(f'{source_name}/{file}')
    destination = client.bucket(target_bucket)
    _call(
      target,
      'copying',
      lambda **kw: client.bucket(source_bucket).copy_blob(blob, destination, f'{target_name}/{file}', **kw),
    )
  rmtree(source)


def replace(source, target) -> None:
  """Moves the file `source` over `target` (on gs://: a server-side copy, then the source deleted; the
  target's object is replaced atomically)."""
  if not is_remote(source) and not is_remote(target):
    os.replace(path(source), path(target))
    return
  if is_remote(source) and is_remote(target):
    source_bucket, source_name = split(source)
    target_bucket, target_name = split(target)
    client = _gcs_client()
    blob = client.bucket(source_bucket).blob(source_name)
    destination = client.bucket(target_bucket)
    _call(
      target,
      'copying',
      lambda **kw: client.bucket(source_bucket).copy_blob(blob, destination, target_name, **kw),
    )
    remove(source, missing_ok=True)
    return
  write_bytes(target, read_bytes(source))
  remove(source)


def upload_file(local_file, location) -> None:
  """Copies a local file to `location` (local or gs://) as one object."""
  if not is_remote(location):
    shutil.copyfile(local_file, path(location))
    return
  blob = _blob(location)
  _call(location, 'writing', lambda **kw: blob.upload_from_filename(str(local_file), **kw))


def download_file(location, local_file) -> None:
  """Copies `location` (local or gs://) to a local file."""
  if not is_remote(location):
    shutil.copyfile(path(location), local_file)
    return
  blob = _blob(location)
  _call(location, 'reading', lambda **kw: blob.download_to_filename(str(local_file), **kw))


# ----------------------------------------------------------------------------------------------------------
# Reading data from gs:// (data.data_dir): listings, and a local cache of whole objects.


def scan(location) -> tuple[list[str], list[str]]:
  """(the sorted names of the files, the sorted names of the directories) directly under `location`; on
  gs:// one prefix listing with a `/` delimiter (a directory is a prefix with objects under it)."""
  if not is_remote(location):
    entries = list(os.scandir(path(location)))
    return (
      sorted(entry.name for entry in entries if entry.is_file()),
      sorted(entry.name for entry in entries if entry.is_dir()),
    )
  files, folders = _list(location)
  return sorted(name for name in files if name), sorted(name for name in folders if name)


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
  size: int
  generation: int  # Cloud Storage's version number of the object: a rewrite gets a new one


def list_tree(location) -> dict[str, ObjectInfo]:
  """Every object under the gs:// prefix `location`, at any depth, by its name relative to `location`, with
  its size and generation: one listing (paginated by the client)."""
  bucket, name = split(location)
  prefix = f'{name}/' if name else ''

  def listing(**kw):
    return {
      blob.name[len(prefix) :]: ObjectInfo(int(blob.size or 0), int(blob.generation or 0))
      for blob in _gcs_client().list_blobs(bucket, prefix=prefix, **kw)
      if not blob.name.endswith('/')  # a folder placeholder some tools create
    }

  return _call(location, 'listing', listing)


CACHE_ENV = 'ATLAS_JAX_GCS_CACHE'


def cache_root() -> pathlib.Path:
  """Where `local_copy` keeps objects: $ATLAS_JAX_GCS_CACHE, else ~/.cache/atlas_jax/gcs."""
  configured = os.environ.get(CACHE_ENV, '').strip()
  return pathlib.Path(configured or '~/.cache/atlas_jax/gcs').expanduser()


def local_copy(location, info: ObjectInfo | None = None) -> pathlib.Path:
  """The local file holding the gs:// object `location`: downloaded whole, once, into
  `cache_root()/objects/BUCKET/NAME`, and reused while the object's generation is the one downloaded
  (`info` from `list_tree` saves a lookup). A download goes to a temporary file renamed over the target, under
  an flock shared by the processes of one machine, so a reader never sees part of a file and concurrent
  processes download each object once."""
  import fcntl

  bucket, name = split(location)
  if not name:
    raise StorageError(f'{location} names a bucket, not an object')
  root = cache_root()
  target = root / 'objects' / bucket / name
  marker = root / 'generations' / bucket / name  # "<generation> <size>" of the object in `target`
  blob = _blob(location)
  if info is None:
    _call(location, 'looking up', lambda **kw: blob.reload(**kw))
    info = ObjectInfo(int(blob.size or 0), int(blob.generation or 0))
  stamp = f'{info.generation} {info.size}'

  def current() -> bool:
    try:
      return marker.read_text() == stamp and target.stat().st_size == info.size
    except OSError:
      return False

  if current():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  marker.parent.mkdir(parents=True, exist_ok=True)
  with open(marker.with_name(f'.{marker.name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if current():  # another process downloaded it meanwhile
      return target
    temporary = target.with_name(f'.{target.name}.{os.getpid()}.{threading.get_ident()}.tmp')
    try:
      # The generation listed: a rewrite of the object in the middle of a download fails it (412)
      # instead of mixing two versions.
      _call(
        location,
        'reading',
        lambda **kw: blob.download_to_filename(
          str(temporary), if_generation_match=info.generation or None, **kw
        ),
      )
      os.replace(temporary, target)
    finally:
      if temporary.exists():
        temporary.unlink()
    marker.write_text(stamp)
  return target


def local_copies(items: dict[str, ObjectInfo | None], workers: int = 8) -> dict[str, pathlib.Path]:
  """`local_copy` of each gs:// location (with its ObjectInfo when known), `workers` downloads at a time."""
  import concurrent.futures

  if len(items) <= 1:
    return {location: local_copy(location, info) for location, info in items.items()}
  with concurrent.futures.ThreadPoolExecutor(min(workers, len(items))) as pool:
    futures = {location: pool.submit(local_copy, location, info) for location, info in items.items()}
    return {location: future.result() for location, future in futures.items()}


def upload_tree(local_dir, location) -> list[str]:
  """Copies every file under the local directory `local_dir` to `location` (local or gs://) at the same
  relative path; returns the relative paths copied, sorted."""
  local_dir = pathlib.Path(local_dir)
  copied = []
  for file in sorted(local_dir.rglob('*')):
    if not file.is_file():
      continue
    relative = file.relative_to(local_dir).as_posix()
    target = join(location, relative)
    if not is_remote(location):
      target.parent.mkdir(parents=True, exist_ok=True)
    upload_file(file, target)
    copied.append(relative)
  return copied


# ----------------------------------------------------------------------------------------------------------
# tensorstore (orbax's array writes).

_TENSORSTORE_RETRIES = 'gcs_request_retries'


def configure_tensorstore() -> None:
  """Bounds tensorstore's Cloud Storage retries by the policy: orbax builds every tensorstore context from
  its default context, which gets `gcs_request_retries` (tensorstore's own default, 32 retries with a
  backoff up to 32 s, did not fail within 250 s against a dead endpoint)."""
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils
  except ImportError:
    return
  p = policy()
  retries = {
    'max_retries': p.tensorstore_retries(),
    'initial_delay': f'{p.initial_delay_s}s',
    'max_delay': f'{p.max_delay_s}s',
  }
  for name in ('_BASE_TS_CONTEXT', '_DEFAULT_OCDBT_TS_CONTEXT'):
    context = getattr(tensorstore_utils, name, None)
    if isinstance(context, dict):
      context[_TENSORSTORE_RETRIES] = dict(retries)
