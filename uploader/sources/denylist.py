"""Places a worker never reads a source from, whatever ``UPLOADER_SOURCE_ROOTS`` says (even ``/``).

Whoever can put a message on the broker can name a source. The source roots are the real limit;
this short list is the backstop for the worker's *own* secrets, should a root be drawn too wide:

- ``/proc``, ``/sys``, ``/dev``: kernel and process state (``/proc/self/environ`` holds the
  worker's environment, credentials included), devices.
- ``/run/secrets``, ``/var/run/secrets``: container secrets and Kubernetes service-account (and
  EKS web-identity) tokens; ``$CREDENTIALS_DIRECTORY``: systemd's ``LoadCredential=``.
- The AWS shared credentials and config files: ``~/.aws/`` and whatever
  ``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``, ``AWS_WEB_IDENTITY_TOKEN_FILE`` and
  ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`` name.
- Environment files: ``/etc/environment``, any file named ``.env`` or ``.env.<something>``, and
  ``/etc/default/`` and ``/etc/sysconfig/``, where systemd units' ``EnvironmentFile=`` usually
  live (a process cannot learn its unit's ``EnvironmentFile=`` paths cheaply: keep such files
  out of the source roots).
- ``/etc/shadow`` and ``/etc/gshadow`` (and their ``-`` backups).
- Dot-files and dot-directories of home directories: ``/root/.*``, ``/home/*/.*`` and the
  worker's own ``$HOME/.*`` (SSH keys, cloud CLIs' credentials, shell histories).

Each place is matched both as written and through its real path (``/home`` may be a link), and
the checks run twice: on the path a request names (resolved with ``realpath``) before anything is
opened, and on the path the kernel reports for the descriptor actually opened.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

#: Variables naming credential files the AWS SDKs read.
AWS_FILE_VARIABLES = (
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)

_TREES = (
    ("/proc", "kernel and process state, the worker's environment included"),
    ("/sys", "kernel state"),
    ("/dev", "devices"),
    ("/run/secrets", "container secrets"),
    ("/var/run/secrets", "container and Kubernetes service-account secrets"),
    ("/etc/default", "service environment files"),
    ("/etc/sysconfig", "service environment files"),
)
_FILES = (
    ("/etc/environment", "the system's environment file"),
    ("/etc/shadow", "password hashes"),
    ("/etc/shadow-", "password hashes"),
    ("/etc/gshadow", "password hashes"),
    ("/etc/gshadow-", "password hashes"),
)


@dataclass(frozen=True, eq=False)
class Place:
    """One denied place: a whole ``tree``, one ``file``, or the ``dots`` (dot-files and
    dot-directories) of a home directory, or of every directory in ``path`` when ``per_user``."""

    path: str
    kind: str
    why: str
    per_user: bool = False

    @property
    def pattern(self) -> str:
        if self.kind != "dots":
            return self.path
        return os.path.join(self.path, "*", ".*") if self.per_user else os.path.join(self.path, ".*")

    @cached_property
    def spellings(self) -> frozenset[str]:
        """The place as written and as its real path (resolved once: see :func:`denied_places`)."""
        return frozenset({os.path.normpath(self.path), os.path.realpath(self.path)})

    def holds(self, path: str) -> bool:
        """Whether ``path`` (absolute and normalised) lies in this place."""
        for base in self.spellings:
            if path == base:
                if self.kind != "dots":
                    return True
                continue
            prefix = base.rstrip("/") + "/"
            if not path.startswith(prefix):
                continue
            if self.kind != "dots":
                return True
            inside = path[len(prefix):].split("/")
            at = 1 if self.per_user else 0  # /home/<user>/.x, or <home>/.x
            if len(inside) > at and inside[at].startswith("."):
                return True
        return False


#: The environment variables that name denied places.
#: The worker's own private keys, named by its settings (read from the environment).
KEY_FILE_VARIABLES = ("UPLOADER_REDIS_TLS_KEY_FILE", "UPLOADER_MESSAGE_SIGNING_KEY")

_VARIABLES = ("HOME", "CREDENTIALS_DIRECTORY", *AWS_FILE_VARIABLES, *KEY_FILE_VARIABLES)


def denied_places() -> tuple[Place, ...]:
    """The deny-list for this process (its environment names some of the places)."""
    return _deny_list()[0]


def _deny_list() -> tuple[tuple[Place, ...], re.Pattern[str]]:
    return _compiled(tuple(os.environ.get(name, "") for name in _VARIABLES), os.geteuid())


@lru_cache(maxsize=8)
def _compiled(environment: tuple[str, ...], euid: int) -> tuple[tuple[Place, ...], re.Pattern[str]]:
    """The places, and one regular expression that matches a path some place holds (exactly
    :meth:`Place.holds`, every place at once): a check is one match, not a loop over thirty
    spellings (that loop was most of the cost of opening a small file's source)."""
    places = _places(environment, euid)
    alternatives = []
    for place in places:
        for base in sorted(place.spellings):
            prefix = re.escape(base.rstrip("/") + "/")
            if place.kind != "dots":
                alternatives.append(f"{re.escape(base)}$|{prefix}")
            else:
                alternatives.append(prefix + (r"[^/]*/\." if place.per_user else r"\."))
    return places, re.compile("|".join(f"(?:{a})" for a in alternatives) or r"(?!)")


@lru_cache(maxsize=8)
def _places(environment: tuple[str, ...], euid: int) -> tuple[Place, ...]:
    # Built once per environment (a check per source open must stay cheap: resolving every
    # place's real path each time cost 0.35 ms).
    env = dict(zip(_VARIABLES, environment, strict=True))
    homes = {"/root", env["HOME"]}
    try:
        homes.add(pwd.getpwuid(euid).pw_dir)
    except KeyError:
        pass
    places = [Place(path, "tree", why) for path, why in _TREES]
    places += [Place(path, "file", why) for path, why in _FILES]
    for home in sorted(h for h in homes if h and os.path.normpath(h) != "/"):
        places.append(Place(os.path.join(home, ".aws"), "tree", "AWS credentials and config"))
        places.append(Place(home, "dots", "a home directory's dot-files"))
    places.append(Place("/home", "dots", "a home directory's dot-files", per_user=True))
    for variable in AWS_FILE_VARIABLES:
        if env[variable]:
            places.append(Place(os.path.abspath(os.path.expanduser(env[variable])), "file", f"AWS credentials ({variable})"))
    for variable in KEY_FILE_VARIABLES:
        if env[variable]:
            places.append(Place(os.path.abspath(os.path.expanduser(env[variable])), "file", f"the worker's private key ({variable})"))
    if env["CREDENTIALS_DIRECTORY"]:
        places.append(Place(env["CREDENTIALS_DIRECTORY"], "tree", "the service's systemd credentials"))
    for place in places:
        place.spellings  # noqa: B018  (resolved now, once)
    return tuple(places)


def is_env_file(name: str) -> bool:
    return name == ".env" or name.startswith(".env.")


def denial(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` (absolute) is a place sources are never read from, or None."""
    normal = os.path.normpath(os.fspath(path))
    if is_env_file(os.path.basename(normal)):
        return "an environment file (.env)"
    places, any_place = _deny_list()
    if any_place.match(normal) is None:
        return None
    for place in places:
        if place.holds(normal):
            return f"{place.pattern}: {place.why}"
    return None
