"""Uploads to the Hugging Face hub as expected failures: what was asked, why it cannot work here, the fix.

`--push_to_hub` (`vlmtune train`, `vlmtune merge`) and `vlmtune push` are checked before any work, with
huggingface_hub's own means: offline mode (`huggingface_hub.constants.HF_HUB_OFFLINE`, set by
HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), the token (`get_token`, or `--hub_token`), and `whoami` (no
network, a refused token, a read-only token, a namespace the user may not create repositories in).

Decision: an upload that cannot work refuses the run at its start, seconds in rather than hours: the fix
is one login or one flag (`--push_to_hub false`, then `vlmtune push` where there is a network). An
upload that fails at the end (the network went away during the run) never costs the trained model: it
is already saved in output_dir, and the message gives the one command that uploads it later; the
command exits 1, since what was asked did not all happen.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .compat import is_network_error, offline_reason
from .config import arg
from .errors import HubError, UsageError

logger = logging.getLogger(__name__)

# What `Trainer.push_to_hub` leaves out of an upload: private files and checkpoints.
IGNORE_PATTERNS = ["_*", "checkpoint-*"]
_LATER = "or pass --push_to_hub false and upload the result later, where there is a network, with `vlmtune push`"


def describe(err: BaseException) -> str | None:
    """Why a hub call failed, in the user's terms; None when `err` is no hub or network failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return offline_reason() or "offline mode is on"
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status == 401:
            return "the hub refused the token (401: invalid or expired); log in again with `hf auth login`"
        if status == 403:
            return "the token may not write there (403); use a token with write access to that namespace"
        server = " ".join(str(err).split())[:300]
        return f"the hub answered {status}: {server}"
    if is_network_error(err):
        return f"no network connection to {constants.ENDPOINT} ({type(err).__name__}: {err})"
    cause = err.__cause__ or err.__context__
    return describe(cause) if cause is not None else None


def check_push(repo_id: str, token: str | None, asked: str) -> str:
    """Refuse, before any work, an upload to `repo_id` that cannot work from here; return the repository
    id with its namespace (a bare name goes to the token's user, as the Trainer does).

    `asked` names what asked for the upload (`--push_to_hub`, `vlmtune push`) in the messages.
    """
    from huggingface_hub import HfApi, get_token

    if reason := offline_reason():
        raise HubError(
            f"{asked} to {repo_id}: cannot upload to the Hugging Face hub: {reason}. Unset it on a machine with a "
            f"network, {_LATER}."
        )
    token = token or get_token()
    if not token:
        raise HubError(
            f"{asked} to {repo_id}: no Hugging Face token here (no `hf auth login`, no HF_TOKEN, no --hub_token). "
            f"Log in with `hf auth login` and a token with write access, {_LATER}."
        )
    try:
        me = HfApi().whoami(token=token)
    except Exception as err:
        reason = describe(err)
        if reason is None:
            raise
        raise HubError(f"{asked} to {repo_id}: cannot upload: {reason}. Check the connection, {_LATER}.") from err
    user = me.get("name", "?")
    if (me.get("auth", {}).get("accessToken") or {}).get("role") == "read":
        raise HubError(
            f"{asked} to {repo_id}: the token of {user} is read-only. Create a token with write access "
            "(huggingface.co/settings/tokens) and log in with it (`hf auth login`), or pass --hub_token."
        )
    namespace, _, name = repo_id.rpartition("/")
    allowed = [user, *(org.get("name") for org in me.get("orgs") or [])]
    if namespace and namespace not in allowed:
        raise HubError(
            f"{asked} to {repo_id}: {user} cannot create repositories in {namespace!r} (theirs: "
            f"{', '.join(allowed)}); pass --hub_model_id {user}/{name}, or log in as a member of {namespace}."
        )
    return f"{namespace or user}/{name}"


def push_command(folder: Path | str, repo_id: str, private: bool = False) -> str:
    """The one command that uploads `folder` to `repo_id` later."""
    command = f"vlmtune push {shlex.quote(str(folder))} --hub_model_id {repo_id}"
    return command + (" --hub_private_repo true" if private else "")


@contextlib.contextmanager
def hub_errors(what: str, fix: str) -> Iterator[None]:
    """Turn a hub or network failure inside the block into a `HubError`: "`what` failed: why. `fix`"."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:
        reason = describe(err)
        if reason is None:
            raise
        raise HubError(f"{what} failed: {reason}. {fix}") from err


def upload_errors(folder: Path, repo_id: str, private: bool = False) -> contextlib.AbstractContextManager:
    """`hub_errors` for the upload of a saved result: the message says it is safe in `folder` and gives the
    command that uploads it later."""
    return hub_errors(
        f"the result is saved in {folder}, but uploading it to {repo_id}",
        f"Upload it later with: {push_command(folder, repo_id, private)}",
    )


def push_folder(
    folder: Path, repo_id: str, private: bool = False, token: str | None = None, message: str = "vlmtune push"
) -> str:
    """Create the model repository `repo_id` if needed and upload `folder` to it (checkpoints and private
    `_*` files left out, as `Trainer.push_to_hub` leaves them); return the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with upload_errors(folder, repo_id, private):
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder), repo_id=repo.repo_id, commit_message=message, ignore_patterns=IGNORE_PATTERNS
        )
    print(f"Uploaded {folder} to {repo.url}")
    return str(repo.url)


@dataclass
class PushArguments:
    folder: str = arg(None, "The folder to upload: what `vlmtune train` or `vlmtune merge` wrote.")
    hub_model_id: str | None = arg(
        None, "Hub repository (user/name, or a name under your user); default: the folder's name."
    )
    hub_private_repo: bool = arg(False, "Create the repository as private (no effect on one that exists).")
    hub_token: str | None = arg(None, "Hub token (default: the one `hf auth login` saved, or HF_TOKEN).")


def run_push(args: PushArguments) -> str:
    """`vlmtune push FOLDER --hub_model_id user/name`: check, then upload the folder."""
    if not args.folder:
        raise UsageError("usage: vlmtune push FOLDER [--hub_model_id user/name] [--hub_private_repo true]")
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"vlmtune push {args.folder}: no such folder; pass the --output_dir of a training or merge")
    repo_id = check_push(args.hub_model_id or folder.resolve().name, args.hub_token, "vlmtune push")
    return push_folder(folder, repo_id, args.hub_private_repo, args.hub_token)
