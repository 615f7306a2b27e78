"""Every path a user gives (work directories, datasets, annotations, weights, outputs) is an
``etils.epath.Path``: a local path and a cloud-storage URL such as ``gs://bucket/run`` behave the
same (epath reads and writes ``gs://`` through TensorFlow's file system). ``pathlib`` would turn
``gs://bucket/run`` into the local folder ``gs:/bucket/run``.

Readers that need a local file (an mmap, a C library) get one through ``local_file``; writers
that only write local files write into ``local_dir`` and have it copied up.
"""
import contextlib
import os
import shutil
import tempfile

from etils import epath


def user_path(path):
  """``path`` (a string, os.PathLike or epath.Path) as an epath.Path; ``~`` expanded locally."""
  text = os.fspath(path)
  return epath.Path(text) if is_remote(text) else epath.Path(text).expanduser()


def absolute(path):
  """``user_path(path)``, made absolute where it is local (orbax and JAX's cache want that)."""
  path = user_path(path)
  return path if is_remote(path) else path.absolute()


def is_remote(path):
  """True for a URL (``gs://...``, ``s3://...``), False for a local path."""
  return "://" in os.fspath(path)


@contextlib.contextmanager
def local_file(path):
  """A local path holding the file at ``path``: the path itself when local, else a temporary
  copy (deleted on exit)."""
  path = user_path(path)
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="yolov9_jax_") as folder:
    local = epath.Path(folder) / path.name
    local.write_bytes(path.read_bytes())
    yield local


@contextlib.contextmanager
def local_dir(path):
  """A local folder to write ``path``'s files into: ``path`` itself when local (created), else a
  temporary folder whose files are copied to ``path`` when the block ends without an error."""
  path = user_path(path)
  if not is_remote(path):
    path.mkdir(parents=True, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="yolov9_jax_") as folder:
    yield epath.Path(folder)
    copy_tree(epath.Path(folder), path)


def copy_tree(source, target):
  """Copies the files below ``source`` into ``target`` (either local or remote), keeping the
  relative layout; existing files are replaced."""
  source, target = user_path(source), user_path(target)
  if not is_remote(source) and not is_remote(target):
    shutil.copytree(source, target, dirs_exist_ok=True)
    return
  for folder, _, files in source.walk():
    destination = target / folder.relative_to(source)
    destination.mkdir(parents=True, exist_ok=True)
    for name in files:
      (destination / name).write_bytes((folder / name).read_bytes())


def append_text(path, text):
  """Appends ``text`` to the file at ``path``. Cloud storage objects cannot be appended to, so
  there the file is rewritten whole (the logs written this way stay small)."""
  path = user_path(path)
  if not is_remote(path):
    with path.open("a") as file:
      file.write(text)
    return
  path.write_text((path.read_text() if path.exists() else "") + text)
