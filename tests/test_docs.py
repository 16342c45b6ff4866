"""The repository documents itself: no tracked file points at a document outside it, every `docs/*.md` a
file names exists, and the license and citation files are there."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parents[1]
# Documents that lived beside the repository while it was written and never ship with it. Spelt in pieces
# so this file does not name them itself.
OUTSIDE_DOCUMENTS = tuple(
  name + suffix
  for name, suffix in (
    ('DESIGN', '.md'),
    ('ATLAS', '.md'),
    ('PERFORMANCE', '_NOTES'),
    ('JAX', '_CONVENTIONS'),
  )
)
DOC_REFERENCE = re.compile(r'\bdocs/[A-Za-z0-9_./-]+\.md\b')


def tracked_files() -> list[pathlib.Path]:
  """The repository's files: git's tracked and not-ignored untracked ones, else every file outside .git."""
  try:
    listed = subprocess.run(
      ['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
      cwd=ROOT,
      capture_output=True,
      check=True,
      timeout=60,
    ).stdout
    paths = [ROOT / name for name in listed.decode().split('\0') if name]
  except (OSError, subprocess.SubprocessError):
    paths = [path for path in ROOT.rglob('*') if '.git' not in path.relative_to(ROOT).parts]
  return [path for path in paths if path.is_file()]


def text_files() -> dict[pathlib.Path, str]:
  texts = {}
  for path in tracked_files():
    data = path.read_bytes()
    if b'\0' in data[:8192]:
      continue  # binary: images, checkpoints, arrays
    texts[path] = data.decode('utf-8', errors='replace')
  return texts


@pytest.fixture(scope='module')
def texts():
  return text_files()


def test_no_file_refers_to_a_document_outside_the_repository(texts):
  found = [
    f'{path.relative_to(ROOT)}:{number}: {line.strip()}'
    for path, text in texts.items()
    for number, line in enumerate(text.splitlines(), 1)
    if any(name in line for name in OUTSIDE_DOCUMENTS)
  ]
  assert not found, 'references to documents outside the repository:\n' + '\n'.join(found)


def test_every_docs_page_a_file_names_exists(texts):
  missing = sorted(
    {
      f'{reference} (named in {path.relative_to(ROOT)})'
      for path, text in texts.items()
      for reference in DOC_REFERENCE.findall(text)
      if not (ROOT / reference).is_file()
    }
  )
  assert not missing, 'docs pages named but absent:\n' + '\n'.join(missing)


def test_license_and_citation_are_shipped():
  license_text = (ROOT / 'LICENSE').read_text()
  assert 'Apache License' in license_text and 'Version 2.0, January 2004' in license_text
  assert 'END OF TERMS AND CONDITIONS' in license_text
  citation = (ROOT / 'CITATION.cff').read_text()
  assert re.search(r'^cff-version: 1\.2\.0$', citation, re.MULTILINE)
  assert 'preferred-citation:' in citation and re.search(r'^  type: article$', citation, re.MULTILINE)
  assert '2503.12355' in citation and 'Multi-Scale Attention Improves Long Context Image Modeling' in citation
  for name in ('Agrawal', 'Lian', 'Liu', 'Harguindeguy', 'Li', 'Bick', 'Chung', 'Darrell', 'Yala'):
    assert f'family-names: {name}\n' in citation
