"""Where a database password may come from: a file (``password_file``) or an environment
variable (``password_env``), never the config itself. One rule for every DSN taskd takes: the
bundled ``sql_query`` plugin's option and the ``[fleet]`` table's ``dsn``.

The DSN is checked when the config is read (a password in it is an error naming the key, and
the password is never shown); the password is read when a connection opens, so a rotated one
is picked up by the next connection."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

MAX_PASSWORD_LINE = 64 * 1024


@dataclass(frozen=True, slots=True)
class SecretKeys:
    """How messages name the keys involved, e.g. ``option 'dsn'`` (a plugin's options) or
    ``fleet.dsn`` (a table of the config), and what they start with (``sql_query: ``)."""

    dsn: str
    file: str
    env: str
    prefix: str = ""

    def no_password(self) -> str:
        return (
            f"The config is no place for a password: put it in a file ({self.file}, mode "
            f"0600) or an environment variable ({self.env}), and drop it from the DSN."
        )


class PasswordUnavailable(RuntimeError):
    """The password file or variable the config names cannot give a password (the message
    says which and why, never the password)."""


def dsn_without_password(dsn: str, keys: SecretKeys) -> SplitResult:
    """``dsn`` split, once it is known to hold no password (in its user part or as a
    ``password`` parameter); raises ValueError naming ``keys.dsn`` otherwise, without the
    password. Its scheme is the caller's to check."""
    parts = urlsplit(dsn)
    elsewhere = "@" in dsn.split("://", 1)[-1][len(parts.netloc) :]
    if "@" not in parts.netloc and elsewhere:
        # A "/", "#" or "?" in a password ends the host part early ("u:Se/cret@h" reads
        # as host "u", port "Se"): nothing of the DSN can be shown safely.
        raise ValueError(
            f"{keys.prefix}{keys.dsn} ({parts.scheme}://...) has an '@' after its host "
            f"part: a password with '/', '#' or '?' in it? {keys.no_password()} If the '@' "
            f"belongs in the database name or a parameter, write it as %40"
        )
    # Keys decoded as the drivers decode them: ?pass%77ord= is ?password=.
    in_query = any(
        unquote(p.split("=", 1)[0]).lower() == "password" for p in parts.query.split("&")
    )
    if parts.password is not None or in_query:
        shown = dsn.replace(f":{parts.password}@", ":***@", 1) if parts.password else dsn
        shown = shown.split("?", 1)[0] + ("?..." if parts.query else "")
        raise ValueError(
            f"{keys.prefix}{keys.dsn} {shown!r} has a password in it. {keys.no_password()}"
        )
    return parts


def one_source(file: str | None, env: str | None, keys: SecretKeys) -> None:
    """Raise ValueError when both ``password_file`` and ``password_env`` are given."""
    if file is not None and env is not None:
        raise ValueError(f"{keys.prefix}give at most one of {keys.file} and {keys.env}")


def read_password(file: str | None, env: str | None, keys: SecretKeys) -> str | None:
    """The password from ``env`` (the daemon's environment) or the first line of ``file``
    (a note may follow it: who rotated it, when); None when neither is given. Blocking (a
    stat can hang on a dead network mount): call it in a thread from the loop. Raises
    PasswordUnavailable when the source gives no password, ValueError when both are given."""
    one_source(file, env, keys)
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise PasswordUnavailable(
                f"{keys.prefix}{keys.env}: the environment variable {env!r} is "
                f"{'empty' if value == '' else 'not set'} in the daemon's environment"
            )
        return value
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                value = f.readline(MAX_PASSWORD_LINE).rstrip("\r\n")
        except OSError as exc:
            raise PasswordUnavailable(
                f"{keys.prefix}{keys.file} {file!r}: {exc.strerror or exc}"
            ) from None
        if not value:
            raise PasswordUnavailable(
                f"{keys.prefix}{keys.file} {file!r}: its first line is empty (the "
                f"password goes on the first line)"
            )
        return value
    return None
