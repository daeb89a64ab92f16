"""`--hf-upload-path ORG/NAME`: push the finished, verified target to the Hugging Face Hub with
huggingface_hub. A failure never touches the local output; the message says how to retry."""
from __future__ import annotations

import logging
import os

from .errors import MergeError, MergeIOError

log = logging.getLogger("distmerge")
LARGE_FOLDER_BYTES = 5 * 10**9   # from here on, upload_large_folder (resumable, parallel) where it exists


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def upload(target: str, repo_id: str, private: bool, revision: str | None = None) -> str:
    """Create the repo if needed and upload every file of target; returns the repo URL. With a
    revision, onto that branch, created when missing (`watch` puts step N on `step-N`)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise MergeError(f"--hf-upload-path needs huggingface_hub (pip install 'distmerge[hub]'); the merged model "
                         f"is complete in {target}") from None
    retry = (f"the merged model is complete in {target}; upload it later with: hf upload {repo_id} {target}"
             + (f" --revision {revision}" if revision else ""))
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        large = getattr(api, "upload_large_folder", None)
        if large is not None and folder_bytes(target) >= LARGE_FOLDER_BYTES:
            large(repo_id=repo_id, folder_path=target, repo_type="model", private=private, revision=revision)
        else:
            api.upload_folder(repo_id=repo_id, folder_path=target, repo_type="model", revision=revision,
                              commit_message="Upload model merged by distmerge")
    except Exception as e:  # noqa: BLE001 - every failure gets the same advice
        raise MergeIOError(f"upload to {repo_id} at {api.endpoint} failed: {describe_failure(e)}; {retry}") from None
    log.info("uploaded %s to %s%s", target, url, f" (revision {revision})" if revision else "")
    return str(url)


def describe_failure(e: Exception) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    name = type(e).__name__
    if status in (401, 403) or "Token" in name or "Unauthorized" in str(e):
        return (f"not authorised ({status or name}): log in with `hf auth login` or set HF_TOKEN to a token "
                "with write access")
    if status is None and any(word in name for word in ("Connect", "Timeout", "Network", "OSError")):
        return f"cannot reach the Hub ({name}: {str(e)[:200]}); check the network or HF_ENDPOINT"
    return f"{name}{f' (HTTP {status})' if status else ''}: {str(e)[:300]}"
