"""The Hugging Face Hub, and nothing else: download a repo's files (``hf-hub:user/name[@revision]``)
and upload a folder to a model repo. What the files are (a model folder) is :mod:`capcli.store.folder`'s
business.

Downloads go through ``huggingface_hub.snapshot_download`` and its cache (``HF_HOME``,
``HF_HUB_CACHE``): a repo is fetched once; with ``HF_HUB_OFFLINE=1`` only the cache is used.
Every Hub failure becomes a one-line :class:`~capcli.errors.UserError` naming the repo and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from capcli.errors import UserError
from capcli.version import __version__

HUB_PREFIX = "hf-hub:"  # a MODEL source on the Hub: hf-hub:user/name[@revision]

# the Hub's rule for a repo id: namespace/name, letters, digits, '-', '_', '.', at most 96 each,
# not starting or ending with '-' or '.', without '--' or '..'
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
LOGIN_HINT = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"


def _hf():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise UserError("the Hugging Face Hub needs the huggingface_hub package (a dependency of timm, "
                        "missing here): pip install huggingface_hub") from exc
    return huggingface_hub


def check_repo_id(repo_id: str) -> str:
    """``user/name`` as the Hub spells repo ids, else a UserError."""
    repo_id = (repo_id or "").strip()
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise UserError(f"repo id {repo_id!r} is not of the form user/name (letters, digits, '-', '_', '.'); "
                        "e.g. --repo alice/convnext-captioner")
    return repo_id


def parse_source(source: str) -> tuple[str, str | None]:
    """``hf-hub:user/name[@revision]`` -> (repo id, revision or None)."""
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        raise UserError(f"{text!r} is not a Hub model; write hf-hub:user/name or hf-hub:user/name@revision")
    rest = text[len(HUB_PREFIX):].strip()
    repo_id, sep, revision = rest.partition("@")
    if sep and not revision:
        raise UserError(f"{text}: empty revision after '@'; write hf-hub:user/name@REVISION (a branch, tag or commit)")
    try:
        check_repo_id(repo_id)
    except UserError:
        raise UserError(f"{text}: {repo_id!r} is not a Hub repo id; write hf-hub:user/name[@revision]") from None
    return repo_id, (revision or None)


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _network_error(exc: Exception) -> bool:
    """A connection/transport failure (huggingface_hub speaks httpx; older versions, requests)."""
    return isinstance(exc, (OSError, ConnectionError)) or any(
        type(exc).__module__.startswith(m) for m in ("httpx", "requests", "urllib3"))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def download(source: str, files: tuple[str, ...]) -> Path:
    """The local folder (in the Hugging Face cache) holding ``files`` of ``hf-hub:user/name[@revision]``."""
    repo_id, revision = parse_source(source)
    hf = _hf()
    from huggingface_hub import constants, errors

    try:
        folder = hf.snapshot_download(repo_id, revision=revision, repo_type="model",
                                      allow_patterns=list(files), library_name="capcli",
                                      library_version=__version__)
    except errors.RevisionNotFoundError as exc:
        raise UserError(f"{source}: revision {revision!r} not found in the Hub repo {repo_id}; "
                        "give an existing branch, tag or commit") from exc
    except errors.GatedRepoError as exc:
        raise UserError(f"{source}: the Hub repo {repo_id} is gated; accept its terms on "
                        f"https://huggingface.co/{repo_id} and {LOGIN_HINT}") from exc
    except errors.RepositoryNotFoundError as exc:
        raise UserError(f"{source}: repository {repo_id} not found on the Hugging Face Hub (or it is private: "
                        f"{LOGIN_HINT}); check the name") from exc
    except errors.LocalEntryNotFoundError as exc:  # offline, unreachable, or a partial cache
        if getattr(constants, "HF_HUB_OFFLINE", False):
            raise UserError(f"{source}: HF_HUB_OFFLINE=1 uses only the local Hugging Face cache, and {repo_id}"
                            f"{'@' + revision if revision else ''} is not (fully) in it; run once without "
                            "HF_HUB_OFFLINE to download it") from exc
        raise UserError(f"{source}: cannot reach the Hugging Face Hub and {repo_id} is not in the local cache "
                        f"({_first_line(exc)}); check the network (once downloaded, HF_HUB_OFFLINE=1 uses the "
                        "local cache)") from exc
    except errors.HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise UserError(f"{source}: the Hub refused access to {repo_id} (HTTP {status}); {LOGIN_HINT} "
                            "with a token that can read it") from exc
        raise UserError(f"{source}: the Hugging Face Hub failed (HTTP {status}: {_first_line(exc)}); "
                        "try again later, or set HF_HUB_OFFLINE=1 to use the local cache") from exc
    except ValueError as exc:  # huggingface_hub's HFValidationError and friends
        raise UserError(f"{source}: {_first_line(exc)}") from exc
    except Exception as exc:  # connection errors that were not turned into cache lookups (a proxy)
        if not _network_error(exc):
            raise
        raise UserError(f"{source}: cannot reach the Hugging Face Hub for {repo_id} ({_first_line(exc)}); check "
                        "the network, or set HF_HUB_OFFLINE=1 to use the local cache") from exc
    return Path(folder)


def require_login(repo_id: str, token: str | None = None) -> str:
    """``repo_id`` checked, and a UserError unless a Hub token is at hand (``token``, HF_TOKEN or a
    login): before any work that an upload would end."""
    repo_id = check_repo_id(repo_id)
    if not (token or _hf().get_token()):
        raise UserError(f"not logged in to the Hugging Face Hub, so cannot push to {repo_id}: {LOGIN_HINT}, "
                        "or pass --token")
    return repo_id


def upload(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None,
           commit_message: str | None = None) -> str:
    """Upload ``folder``'s files to the Hub model repo ``repo_id`` (created if missing); its URL."""
    repo_id = require_login(repo_id, token)
    hf = _hf()
    from huggingface_hub import errors

    api = hf.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    except errors.LocalTokenNotFoundError as exc:
        raise UserError(f"not logged in to the Hugging Face Hub, so cannot push to {repo_id}: {LOGIN_HINT}") from exc
    except errors.HfHubHTTPError as exc:
        status = _status(exc)
        if status == 401:
            raise UserError(f"the Hub did not accept the token (HTTP 401) pushing to {repo_id}: {LOGIN_HINT} "
                            "with a valid token") from exc
        if status == 403:
            raise UserError(f"the token cannot write to {repo_id} (HTTP 403); use a token with write access to "
                            "that user or organisation, or push to your own namespace") from exc
        raise UserError(f"pushing to {repo_id} failed (HTTP {status}: {_first_line(exc)})") from exc
    except ValueError as exc:
        raise UserError(f"pushing to {repo_id}: {_first_line(exc)}") from exc
    except Exception as exc:
        if not _network_error(exc):
            raise
        raise UserError(f"cannot reach the Hugging Face Hub to push {repo_id} ({_first_line(exc)}); check the "
                        "network") from exc
    return str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")
