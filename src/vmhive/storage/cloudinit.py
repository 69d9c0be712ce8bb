"""Cloud-init NoCloud seeds: a small ISO labelled `cidata` with meta-data and user-data.

cloud-init (and the tiny guest's own reader) find the seed by its volume
label and read `meta-data` (instance-id, local-hostname) and `user-data`.
A new instance-id tells the guest it is a new machine (a clone), so it runs
its first-boot configuration again.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pycdlib

SEED_LABEL = "cidata"


def meta_data(instance_id: str, hostname: str) -> str:
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def build_seed_iso(dest: Path, *, instance_id: str, hostname: str, user_data: str | None) -> None:
    """Write the seed atomically (a temp file renamed into place)."""
    files = {
        "meta-data": meta_data(instance_id, hostname).encode(),
        "user-data": (user_data or "#cloud-config\n{}\n").encode(),
    }
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_LABEL)
    try:
        for name, data in files.items():
            iso_name = "/" + name.replace("-", "").upper()[:8] + ".;1"
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
        tmp = dest.with_name(f".{dest.name}.tmp")
        iso.write(str(tmp))
    finally:
        iso.close()
    os.chmod(tmp, 0o600)
    tmp.replace(dest)
