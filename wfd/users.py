"""Who a uid is: the user and group database, asked in one place.

The database may be remote (NSS: LDAP, sssd), so the daemon calls these off
the event loop, once per run, and keeps what they said with the run.
"""

from __future__ import annotations

import os
import pwd
from typing import NamedTuple


class UserIds(NamedTuple):
    """Whom a step runs as when that is not the daemon's own user."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def name_of(uid: int) -> str:
    """The user's name, or the uid as a string if it has none (SPEC 5, `owner`)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def describe(uid: int) -> str:
    """`uid 1000 (alice)`, for messages."""
    name = name_of(uid)
    return f"uid {uid}" if name == str(uid) else f"uid {uid} ({name})"


def login_env(uid: int) -> dict[str, str]:
    """HOME, USER, LOGNAME and SHELL from the passwd entry ({} if there is none)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {}
    return {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
            "SHELL": entry.pw_shell or "/bin/sh"}


def user_ids(uid: int, fallback_gid: int) -> UserIds:
    """uid, primary gid and groups from the database, as at login (not the client's
    effective gid); a uid with no entry keeps only `fallback_gid`."""
    try:
        entry = pwd.getpwuid(uid)
        return UserIds(uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    except KeyError:
        return UserIds(uid, fallback_gid, (fallback_gid,))


def in_group(uid: int, gid: int) -> bool:
    """Membership from the group database: SO_PEERCRED carries only the primary gid."""
    try:
        entry = pwd.getpwuid(uid)
        return gid in os.getgrouplist(entry.pw_name, entry.pw_gid)
    except KeyError:
        return False
