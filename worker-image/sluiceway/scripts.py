"""The Lua scripts, loaded once per client. redis-py reloads them by itself after a Redis restart."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.commands.core import Script


def source(name: str) -> str:
    return resources.files("sluiceway").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    fetch: Script
    ack: Script
    retry: Script
    dead: Script
    requeue: Script
    renew: Script
    reap: Script
    acquire: Script

    @classmethod
    def register(cls, client: Any) -> Scripts:
        return cls(**{name: client.register_script(source(name)) for name in cls.__slots__})
