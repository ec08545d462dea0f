"""Hub sources (org/name[@revision], hf://org/name[@revision]).

Placeholder until the Hub issue lands: Hub ids are recognised, and refused with a clear message.
"""

from __future__ import annotations

import re

from fapm_cli.errors import InputError

_REPO_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s]+)?$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


class HubSource:
    @classmethod
    def from_text(cls, text: str) -> HubSource:
        raise InputError(
            f"{text}: not found locally, and Hub sources are not supported yet",
            hint="download the checkpoint first (huggingface-cli download) and pass its directory",
        )
