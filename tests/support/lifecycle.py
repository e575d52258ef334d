"""The start/stop/context-manager shape every emulator and process of the harness shares."""

from __future__ import annotations

from typing import Self


class Service:
    """Something started and stopped; ``with`` starts it and always stops it."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
