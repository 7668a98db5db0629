"""``sluiceway-operator`` / ``python -m sluiceway_operator``: run the operator.

kopf runs in-process, standalone (no peering: one replica, Recreate strategy), watching the
namespaces given with ``-n`` or all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

import kopf

from sluiceway import log as slog

from . import handlers, metrics
from .kube import login_handler
from .settings import parse_args

# Log in through the `kubernetes` package (kube.py): kopf's built-in kubeconfig reader handles
# neither exec nor OIDC credential plugins. Registering a login handler replaces kopf's own.
kopf.on.login(retries=4, backoff=5)(login_handler)
metrics.REGISTRY.register(
    metrics.StatusCollector(
        lambda: [
            (ns, name, loop.status) for (ns, name), loop in handlers.Runtime.loops.items() if loop.status
        ]
    )
)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    slog.configure(fmt=config.log_format, level=config.log_level)
    # kopf logs through stdlib logging; keep its INFO chatter (one line per handler call) out.
    logging.basicConfig(
        stream=sys.stderr, level=max(logging.WARNING, logging.getLevelName(config.log_level.upper()))
    )
    handlers.configure(config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            kopf.operator(
                standalone=True,
                clusterwide=not config.namespaces,
                namespaces=list(config.namespaces),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
