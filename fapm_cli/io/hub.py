"""Hub sources: ``org/name``, ``org/name@revision``, ``hf://org/name@revision``.

A ``HubSource`` answers the ``Source`` questions for one repo at one commit, through
huggingface_hub (its cache, its auth and its environment: ``HF_TOKEN``, ``HF_HOME``,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT``):

- the revision is resolved to a commit sha once (``model_info``); every later request names that
  sha, so a branch that moves during a run cannot mix two versions of a model;
- headers are read remotely with ranged GETs of the first bytes of each shard and judged by
  ``fapm_cli.header`` exactly as local files are, so ``fapm inspect`` and the base/finetuned
  pairing check need no weight download;
- a shard is fetched (``hf_hub_download``) only when the engine first reads from it.

With a ``DiskBudget``, shards that are not already in the user's cache are downloaded into a
private temporary directory instead of the cache, and deleted as soon as the engine releases
them. Why not the cache: a cache blob can be shared by several snapshots (same content at two
commits) and by other processes reading it right now, and deleting from a cache the user owns
would surprise them; a directory of our own can be emptied without asking anyone. Shards already
in the cache are read in place and cost the budget nothing.

huggingface_hub errors are translated here, by class, into one-line messages; tokens never
appear in them (we never format a request, a header or a library message into our text).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fapm_cli.errors import FapmError, InputError, ResourceError, UsageError
from fapm_cli.io.header import Header, parse_header, read_header, read_header_length

if TYPE_CHECKING:
    from fapm_cli.io.source import Source

_REPO_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s]+)?$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
# First ranged read of a shard: most headers fit (huggingface_hub's get_safetensors_metadata
# makes the same bet), so one request per shard; a larger header costs a second request.
FIRST_READ = 100_000
_SHARD_SUFFIX = ".safetensors"


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str | None  # None: the default branch


def parse_repo_ref(text: str) -> RepoRef:
    """``org/name[@revision]`` or ``hf://org/name[@revision]`` -> repo id and revision."""
    if not looks_like_repo_id(text):
        raise UsageError(
            f"{text}: not a Hub repo id",
            hint="write org/name, org/name@revision or hf://org/name@revision",
        )
    body = text.removeprefix("hf://")
    repo_id, _, revision = body.partition("@")
    if "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        raise UsageError(
            f"{text}: not a valid Hub repo id (no '--' or '..', at most 96 characters)",
            hint="copy the id from the model page, e.g. meta-llama/Llama-3.1-8B",
        )
    return RepoRef(repo_id, revision or None)


class DiskBudget:
    """Bytes of downloaded shards on disk, shared by the base and finetuned sources of one run.

    The engine orders tensors so that a shard is fetched only while the shards already held fit
    in ``limit``; peak use is then at most ``limit`` plus the shard being fetched. ``peak`` is
    what was actually held (for reports and tests).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._dir: Path | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def directory(self) -> Path:
        """The private download directory, created on first use next to the cache."""
        if self._dir is None:
            from huggingface_hub import constants

            root = Path(constants.HF_HUB_CACHE)
            try:
                root.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix=".fapm-download-", dir=root))
            except OSError as err:
                raise _disk_error(err, str(root)) from err
            # Removed at close(), or at exit if the run dies first: never left in the cache.
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def before_fetch(self, what: str) -> None:
        if self.held > self.limit:
            # The engine's ordering guarantees this never happens; refuse rather than overrun.
            raise ResourceError(
                f"{what}: fetching it would exceed --disk-budget ({self.held} bytes already held)",
                hint="raise --disk-budget",
            )

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def remove(self, nbytes: int) -> None:
        self.held -= nbytes

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
            self._dir = None


class HubSource:
    """One Hub repo at one resolved commit."""

    def __init__(
        self,
        ref: RepoRef,
        commit: str,
        files: list[str],
        display: str,
        *,
        offline: bool,
        budget: DiskBudget | None = None,
        show_progress: bool = False,
    ) -> None:
        self.repo_id = ref.repo_id
        self.revision = ref.revision
        self.commit = commit
        self.files = files
        self.display = display
        self.offline = offline
        self.budget = budget
        self.show_progress = show_progress
        self._fetched: dict[str, tuple[str, int]] = {}  # shard -> (path in our dir, bytes)
        self._ref_recorded = False
        self._target: Path | None = None  # where budgeted shards are downloaded

    # -- resolution ------------------------------------------------------------------------
    @classmethod
    def from_text(
        cls, text: str, *, budget: DiskBudget | None = None, show_progress: bool = False
    ) -> HubSource:
        """Resolve ``text`` to a commit and list its files (from the cache when offline)."""
        from huggingface_hub import HfApi, constants
        from huggingface_hub.hf_api import RepoFile

        ref = parse_repo_ref(text)
        if constants.is_offline_mode():
            commit, files = _from_cache(ref, text)
            return cls(ref, commit, files, text, offline=True, budget=budget)
        api = HfApi()
        with _translated(text, ref, None):
            info = api.model_info(ref.repo_id, revision=ref.revision)
            if not info.sha:
                raise InputError(
                    f"{text}: the Hub did not say which commit this revision is",
                    hint="check that HF_ENDPOINT points to a Hugging Face Hub or mirror",
                )
            tree = api.list_repo_tree(ref.repo_id, revision=info.sha)
            files = sorted(e.path for e in tree if isinstance(e, RepoFile) and "/" not in e.path)
        return cls(
            ref, info.sha, files, text, offline=False, budget=budget, show_progress=show_progress
        )

    # -- Source protocol -------------------------------------------------------------------
    def list_files(self) -> list[str]:
        return list(self.files)

    def read_text(self, name: str, limit: int = 50_000_000) -> str:
        path = self._download(self._check(name), budgeted=False)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as err:
            raise InputError(f"{self._where(name)}: cannot read ({err.strerror})") from err
        if len(data) > limit:
            raise InputError(f"{self._where(name)}: larger than {limit} bytes, refusing to read")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{self._where(name)}: not UTF-8 text") from err

    def read_header(self, name: str) -> Header:
        self._check(name)
        local = self._local_copy(name)
        if local is not None:
            return read_header(local, self._where(name))
        if self.offline:
            raise _offline_error(self.display, name)
        return self._remote_header(name)

    def local_path(self, name: str) -> str:
        return self._download(self._check(name), budgeted=name.endswith(_SHARD_SUFFIX))

    def release(self, name: str) -> None:
        fetched = self._fetched.pop(name, None)
        if fetched is None or self.budget is None:
            return  # a shard in the user's cache stays there
        path, nbytes = fetched
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _disk_error(err, path) from err
        self.budget.remove(nbytes)

    def provenance(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    # -- disk budget -----------------------------------------------------------------------
    def fetch_size(self, name: str, header: Header) -> int:
        """Bytes that reading shard ``name`` would add to the disk (0 when already cached)."""
        if self.budget is None or self._local_copy(name) is not None:
            return 0
        return header.file_size

    # -- helpers ---------------------------------------------------------------------------
    def _where(self, name: str) -> str:
        return f"{self.display}/{name}"

    def _check(self, name: str) -> str:
        from fapm_cli.io.source import is_plain_filename

        if not is_plain_filename(name):
            raise InputError(
                f"{self.display}: index names file {name!r} outside the repo's top directory",
                hint="the index is corrupted or hostile; weight_map values must be plain names",
            )
        if name not in self.files:
            what = "is not in the cache" if self.offline else "does not exist"
            raise InputError(
                f"{self.display}: file {name!r} {what} at commit {self.commit[:12]}",
                hint="the repo is incomplete at this revision"
                if not self.offline
                else "download the whole repo once online (hf download), then retry",
            )
        return name

    def _local_copy(self, name: str) -> str | None:
        """A copy already on disk: fetched by this run, or in the huggingface_hub cache."""
        from huggingface_hub import try_to_load_from_cache

        fetched = self._fetched.get(name)
        if fetched is not None:
            return fetched[0]
        cached = try_to_load_from_cache(self.repo_id, name, revision=self.commit)
        return cached if isinstance(cached, str) else None

    def _download(self, name: str, *, budgeted: bool) -> str:
        from huggingface_hub import hf_hub_download

        local = self._local_copy(name)
        if local is not None:
            return local
        if self.offline:
            raise _offline_error(self.display, name)
        tqdm_class = None if self.show_progress else _silent_tqdm()
        ref = RepoRef(self.repo_id, self.revision)
        if not budgeted or self.budget is None:
            with _translated(self.display, ref, name):
                path = str(
                    hf_hub_download(self.repo_id, name, revision=self.commit, tqdm_class=tqdm_class)
                )
            self._remember_revision(Path(path))
            return path
        self.budget.before_fetch(self._where(name))
        if self._target is None:  # one directory per source: base and finetuned never share files
            prefix = f"{self.repo_id.replace('/', '--')}--{self.commit[:12]}-"
            try:
                self._target = Path(tempfile.mkdtemp(prefix=prefix, dir=self.budget.directory()))
            except OSError as err:
                raise _disk_error(err, str(self.budget.directory())) from err
        target = self._target
        with _translated(self.display, ref, name):
            path = str(
                hf_hub_download(
                    self.repo_id,
                    name,
                    revision=self.commit,
                    local_dir=target,
                    tqdm_class=tqdm_class,
                )
            )
        nbytes = os.path.getsize(path)
        self._fetched[name] = (path, nbytes)
        self.budget.add(nbytes)
        return path

    def _remember_revision(self, cached: Path) -> None:
        """Record revision -> commit in the cache's refs/, as huggingface_hub does for the
        revision it is given: we always give it the sha, so without this the cached files
        could not be found again by branch or tag name offline. ``cached`` is the path
        ``hf_hub_download`` returned, ``<repo folder>/snapshots/<commit>/<file>``: the repo's
        folder comes from it, not from the cache's naming rule."""
        revision = self.revision or "main"
        if revision == self.commit or self._ref_recorded or ".." in revision.split("/"):
            return
        # Plain file names only (``_check``): the repo folder is three levels up.
        path = cached.parents[2] / "refs" / revision
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.commit)
        except OSError:
            pass  # best effort, like the library: the cache may be read-only
        self._ref_recorded = True

    def _remote_header(self, name: str) -> Header:
        where = self._where(name)
        with _translated(self.display, RepoRef(self.repo_id, self.revision), name):
            data, size = self._ranged_get(name, 0, FIRST_READ)
            n = read_header_length(data[:8], where, size)
            raw = data[8 : 8 + n] if len(data) >= 8 + n else self._ranged_get(name, 8, 8 + n)[0]
        if len(raw) != n:
            raise InputError(f"{where}: the server sent a short header", hint="retry the run")
        return parse_header(raw, where, size)

    def _ranged_get(self, name: str, start: int, stop: int) -> tuple[bytes, int]:
        """Bytes ``[start, stop)`` of a file (fewer if it is shorter) and the file's size."""
        from huggingface_hub import constants, hf_hub_url, hf_raise_for_status
        from huggingface_hub.utils import (  # type: ignore[attr-defined]
            build_hf_headers,
            http_stream_backoff,
        )

        url = hf_hub_url(self.repo_id, name, revision=self.commit)
        headers = build_hf_headers()
        headers["Range"] = f"bytes={start}-{stop - 1}"
        headers["Accept-Encoding"] = "identity"  # sizes must be the file's, not a gzip's
        timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        # Rate limits and request timeouts are waited out and retried, as the library does for
        # its own downloads (the same status codes); other errors fail at once.
        with http_stream_backoff(
            "GET", url, headers=headers, timeout=timeout, retry_on_exceptions=(),
            retry_on_status_codes=(408, 429),
        ) as response:  # fmt: skip
            if response.status_code == 416:  # the range starts past the end: an empty file
                return b"", _total_from_content_range(response.headers.get("Content-Range"))
            if response.status_code >= 400:
                response.read()  # error bodies are small; the library's message needs them
                hf_raise_for_status(response)
            if response.status_code == 206:
                size = _total_from_content_range(response.headers.get("Content-Range"))
                skip = 0
            else:  # 200: the server ignored Range; read only the prefix we need
                size = int(response.headers.get("Content-Length", "-1"))
                skip = start
            want = stop - start
            buf = bytearray()
            for chunk in response.iter_bytes():
                buf += chunk
                if len(buf) >= skip + want:
                    break
        if size < 0:
            raise InputError(
                f"{self._where(name)}: the server did not say how large the file is",
                hint="check that HF_ENDPOINT points to a Hugging Face Hub or mirror",
            )
        return bytes(buf[skip : skip + want]), size


def _total_from_content_range(value: str | None) -> int:
    if value and value.startswith("bytes */") and value[8:].isdigit():
        return int(value[8:])
    m = _CONTENT_RANGE.match(value or "")
    return int(m.group(3)) if m else -1


def fetch_size(source: Source, shard: str, header: Header) -> int:
    """Bytes that reading ``shard`` of ``source`` puts on disk: 0 unless a Hub download."""
    return source.fetch_size(shard, header) if isinstance(source, HubSource) else 0


# -- the offline cache ---------------------------------------------------------------------


def _from_cache(ref: RepoRef, text: str) -> tuple[str, list[str]]:
    """Commit and file list of a repo in the huggingface_hub cache, with no network: the
    library's own lookup (``snapshot_download(local_files_only=True)`` resolves a branch or
    tag through the cache's refs, and follows the cache's layout as it changes)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = ref.revision or "main"
    try:
        snapshot = Path(snapshot_download(ref.repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise InputError(
            f"{text}: offline (HF_HUB_OFFLINE=1) and revision {revision!r} is not in the cache",
            hint="run once online to fill the cache (or `hf download "
            f"{ref.repo_id} --revision {revision}`), or unset HF_HUB_OFFLINE",
        ) from err
    files = sorted(e.name for e in os.scandir(snapshot) if e.is_file())
    return snapshot.name, files


def _offline_error(display: str, name: str) -> InputError:
    return InputError(
        f"{display}/{name}: offline (HF_HUB_OFFLINE=1) and this file is not in the cache",
        hint="run once online to fill the cache (hf download), or unset HF_HUB_OFFLINE",
    )


# -- errors --------------------------------------------------------------------------------


def _disk_error(err: OSError, what: str) -> FapmError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(
            f"{what}: disk full while downloading",
            hint="free space, or pass a smaller --disk-budget to keep fewer shards on disk",
        )
    return InputError(f"{what}: {err.strerror}", hint="check HF_HOME and its permissions")


@contextmanager
def _translated(display: str, ref: RepoRef, name: str | None) -> Iterator[None]:
    """Turn huggingface_hub and HTTP-client exceptions into fapm errors, by class."""
    try:
        yield
    except FapmError:
        raise
    except Exception as err:
        translated = translate(err, display, ref, name)
        if translated is None:
            raise
        raise translated from err


def translate(err: BaseException, display: str, ref: RepoRef, name: str | None) -> FapmError | None:
    """The fapm error for a huggingface_hub / httpx failure, or None if it is not one."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{display}/{name}" if name else display
    revision = ref.revision or "main"
    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return InputError(
            f"{display}: {ref.repo_id} is gated and this account has not been granted access",
            hint="accept the conditions on the model page, then set HF_TOKEN to a token of "
            "that account (or run `hf auth login`)",
        )
    if isinstance(err, RepositoryNotFoundError):
        return InputError(
            f"{display}: repository {ref.repo_id} not found (or private)",
            hint="check the name; for a private repo set HF_TOKEN to a token with read access",
        )
    if isinstance(err, RevisionNotFoundError):
        return InputError(
            f"{display}: revision {revision!r} not found in {ref.repo_id}",
            hint="give a branch, a tag or a commit sha that exists on the repo",
        )
    if isinstance(err, OfflineModeIsEnabled) or (
        isinstance(err, LocalEntryNotFoundError) and _offline()
    ):
        return InputError(
            f"{what}: offline (HF_HUB_OFFLINE=1) and not in the cache",
            hint="run once online to fill the cache (hf download), or unset HF_HUB_OFFLINE",
        )
    if isinstance(err, LocalEntryNotFoundError):
        cause = err.__cause__
        if isinstance(cause, HfHubHTTPError | httpx2.TransportError):
            nested = translate(cause, display, ref, name)
            if nested is not None:
                return nested
        return InputError(
            f"{what}: cannot reach the Hub and this file is not in the cache",
            hint="check the connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache",
        )
    if isinstance(err, EntryNotFoundError):
        return InputError(
            f"{what}: no such file in {ref.repo_id} at revision {revision!r}",
            hint="the repo is incomplete at this revision",
        )
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else 0
        if status in (401, 403):
            return InputError(
                f"{what}: access denied by the Hub (HTTP {status})",
                hint="set HF_TOKEN to a token with read access to this repo",
            )
        return InputError(
            f"{what}: the Hub answered HTTP {status}",
            hint="retry later; if HF_ENDPOINT is set, check the mirror",
        )
    if isinstance(err, FileMetadataError):
        return InputError(
            f"{what}: the server's answer lacks Hub headers (X-Repo-Commit, ETag)",
            hint="check that HF_ENDPOINT points to a Hugging Face Hub or mirror",
        )
    if isinstance(err, httpx2.TransportError):
        if name is not None:
            return InputError(
                f"{what}: connection lost while downloading",
                hint="check the connection and run again",
            )
        return InputError(
            f"{display}: cannot reach the Hub",
            hint="check the connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache",
        )
    if isinstance(err, HFValidationError):
        return UsageError(
            f"{display}: not a valid Hub repo id or revision",
            hint="write org/name, org/name@revision or hf://org/name@revision",
        )
    if isinstance(err, OSError):  # the download's consistency check, or the disk
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return _disk_error(err, what)
        return InputError(
            f"{what}: download incomplete",
            hint="check the connection and run again",
        )
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _silent_tqdm() -> type[Any]:
    """A tqdm that draws nothing, for downloads while fapm's own bar is off (--quiet, pipes)."""
    from tqdm.auto import tqdm

    class Silent(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
