"""The image table: which local command stands in for a container image.

The test kubelet has no container runtime, so an image is only a name that selects an entrypoint
and default arguments (Docker's ENTRYPOINT and CMD). Kubernetes rules then apply unchanged:
``command`` replaces the entrypoint, ``args`` replace the default arguments, and setting
``command`` alone drops the default arguments.

Built-in rows (matched on the image repository, tag and digest ignored):

=================================================  ==========================================  ============
repository ends with                               entrypoint                                  default args
=================================================  ==========================================  ============
``sluiceway/worker``, ``sluiceway-worker``         ``<kubelet's python> -m sluiceway``         none
``sluiceway/operator``, ``sluiceway-operator``     ``<kubelet's python> -m sluiceway_operator``  none
``busybox``, ``alpine``                            none (commands run from the host PATH)      ``sh``
``python``                                         none                                        ``<kubelet's python>``
=================================================  ==========================================  ============

The Python rows also set ``PYTHONUNBUFFERED=1``, as Python images usually do.

Tests add rows with :meth:`ImageTable.register`; a later row wins over an earlier one.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageEntry:
    suffixes: tuple[str, ...]
    entrypoint: tuple[str, ...]
    default_args: tuple[str, ...] = ()
    description: str = ""
    # The image's own ENV, under the pod's env.
    env: tuple[tuple[str, str], ...] = ()


class UnknownImageError(LookupError):
    pass


def repository(image: str) -> str:
    """``reg:5000/team/app:1.2@sha256:..`` -> ``reg:5000/team/app``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def _matches(repo: str, suffix: str) -> bool:
    return repo == suffix or repo.endswith("/" + suffix)


# Python images set this so `kubectl logs` shows output as it happens.
_PY_ENV = (("PYTHONUNBUFFERED", "1"),)


def default_entries(python: str = sys.executable) -> list[ImageEntry]:
    return [
        ImageEntry(
            ("sluiceway/worker", "sluiceway-worker"),
            (python, "-m", "sluiceway"),
            (),
            "the worker runtime",
            _PY_ENV,
        ),
        ImageEntry(
            ("sluiceway/operator", "sluiceway-operator"),
            (python, "-m", "sluiceway_operator"),
            (),
            "the operator",
            _PY_ENV,
        ),
        ImageEntry(("busybox", "alpine"), (), ("sh",), "shell tools from the host PATH"),
        ImageEntry(("python",), (), (python,), "the kubelet's Python", _PY_ENV),
    ]


class ImageTable:
    def __init__(self, entries: Sequence[ImageEntry] | None = None) -> None:
        self._entries = list(entries if entries is not None else default_entries())
        self._lock = threading.Lock()

    def register(
        self,
        repository_suffix: str,
        entrypoint: Sequence[str],
        default_args: Sequence[str] = (),
        description: str = "",
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Map images whose repository is, or ends in ``/``, ``repository_suffix``."""
        entry = ImageEntry(
            (repository_suffix,),
            tuple(entrypoint),
            tuple(default_args),
            description,
            tuple((env or {}).items()),
        )
        with self._lock:
            self._entries.append(entry)

    def lookup(self, image: str) -> ImageEntry:
        repo = repository(image)
        with self._lock:
            for entry in reversed(self._entries):
                if any(_matches(repo, s) for s in entry.suffixes):
                    return entry
        raise UnknownImageError(
            f"image {image!r} is not in the test kubelet's image table (e2e/localcluster/images.py); "
            "add a row there or call kube_cluster.kubelet.images.register(...)"
        )

    def argv(self, image: str, command: Sequence[str] | None, args: Sequence[str] | None) -> list[str]:
        """The process argv for a container, by the Kubernetes command/args rules."""
        entry = self.lookup(image)
        if command:
            return [*command, *(args or [])]
        return [*entry.entrypoint, *(args if args else entry.default_args)]
