"""`merge --verify`: the `distmerge verify` self-check of the staging directory before publishing."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

from .errors import MergeVerifyError

log = logging.getLogger("distmerge")


def self_check(staging: str, target: str, trust_remote_code: bool = False) -> bool:
    """`distmerge verify` on the staging directory before it is published. It runs in a child
    process: transformers (config, tokenizer, the meta-device model) never enters a merge rank,
    so it adds nothing to the rank's memory and leaves no threads behind in it."""
    from .verify import Report

    proc = subprocess.run([sys.executable, "-m", "distmerge", "verify", staging, "--allow-incomplete", "--json"]
                          + (["--trust-remote-code"] if trust_remote_code else []), capture_output=True, text=True)
    try:
        fields = json.loads(proc.stdout)
        fields.pop("ok")
        report = Report(**fields)
    except (ValueError, KeyError, TypeError):  # the check itself failed to run
        raise MergeVerifyError(f"--verify could not check {staging}, so {target} was not published: "
                               f"{proc.stderr.strip()[-500:]}") from None
    log.info("%s", report.render())
    if report.ok:
        return True
    raise MergeVerifyError(f"--verify found problems in the merged files, so {target} was not published; "
                           f"they are in {staging}: " + "; ".join(report.problems[:5]))
