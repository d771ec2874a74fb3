"""What an EngineConfig sets up in the engine: where relays come from (a directory file, or the DHT view that
discovery keeps fresh) and, in VPN mode, the Tunnel.  ``apply`` checks a whole config before it changes
anything (docs/PROTOCOL.md §9.5 ``configure``); whether the engine may change it now is the engine's call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from shallot.core.control.api import ControlError, EngineConfig, ErrorKind
from shallot.core.discovery.cache import default_cache_path
from shallot.core.discovery.directory import load_directory
from shallot.core.discovery.service import VIEW_REFRESH_S, ClientDiscovery, Seed, parse_seeds
from shallot.core.errors import ShallotError
from shallot.core.vpn.tunnel import Tunnel
from shallot.crypto.descriptor import Descriptor

log = logging.getLogger("shallot.engine")
VIEW_WAIT_S = 15.0  # how long a path waits for the first crawl when discovery knows no relay yet


class EngineSetup:
    def __init__(self, *, own_ids: tuple[bytes, ...] = (), helper_fd: int | None = None) -> None:
        """``own_ids``: this machine's relay (left out of the view).  ``helper_fd``: a socket to a privileged
        helper that is already running, for the first tunnel."""
        self.config = EngineConfig()
        self.directory: Path | None = None
        self.discovery: ClientDiscovery | None = None
        self.tunnel: Tunnel | None = None
        self._own_ids = own_ids
        self._helper_fd = helper_fd
        self._refresher: asyncio.Task[None] | None = None
        self._view_ready = asyncio.Event()

    @property
    def has_relays(self) -> bool:
        """A directory file or discovery: somewhere relays can come from."""
        return self.directory is not None or self.discovery is not None

    def apply(self, config: EngineConfig, *, check_directory: bool = True) -> None:
        """Raises ControlError (BAD_CONFIG, BAD_DIRECTORY) and then changes nothing.  ``check_directory``:
        load the directory file now (the CLI's flags leave that to the first connect, as they always did)."""
        if config.directory and config.bootstrap:
            raise ControlError(ErrorKind.BAD_CONFIG, "give a directory file or bootstrap peers, not both")
        try:
            seeds = [seed for text in config.bootstrap for seed in parse_seeds(text)]
        except ShallotError as exc:
            raise ControlError(ErrorKind.BAD_CONFIG, str(exc)) from None
        if config.directory and check_directory:
            try:
                load_directory(Path(config.directory), private_network=config.private_network)
            except ShallotError as exc:
                raise ControlError(ErrorKind.BAD_DIRECTORY, str(exc)) from None
        old, self.config = self.config, config
        self.directory = Path(config.directory) if config.directory else None
        if (config.bootstrap, config.cache, config.private_network) != (old.bootstrap, old.cache, old.private_network):
            self._stop_discovery()
            if seeds:
                self._start_discovery(seeds, Path(config.cache) if config.cache else default_cache_path())
        if (config.vpn, config.kill_switch) != (old.vpn, old.kill_switch) or (config.vpn and self.tunnel is None):
            self._drop_tunnel()  # the helper session is made for one kill-switch setting
            if config.vpn:
                self.tunnel = Tunnel(kill_switch=config.kill_switch, dns=config.dns, helper_fd=self._helper_fd)
                self._helper_fd = None
        if self.tunnel is not None:
            self.tunnel.dns = config.dns  # read at each CONFIG answer: no new helper session needed

    def set_directory(self, path: Path) -> None:
        """Version 1's ``set_directory``: the file is loaded first; discovery, if any, stays (the file wins)."""
        load_directory(path, private_network=self.config.private_network)  # the error at once
        self.directory = path
        self.config = self.config.replace(directory=str(path))

    async def relays(self) -> list[Descriptor]:
        if self.discovery is not None and not self.discovery.relays():
            with contextlib.suppress(TimeoutError):  # the first crawl is under way: give it its time
                await asyncio.wait_for(self._view_ready.wait(), VIEW_WAIT_S)
        return self.relays_now()

    def relays_now(self) -> list[Descriptor]:
        if self.directory is not None:
            return load_directory(self.directory, private_network=self.config.private_network)
        if self.discovery is None:
            raise ShallotError("no directory file is set: choose one in the settings")
        relays = self.discovery.relays()
        if not relays:
            raise ShallotError("no relay known yet: the DHT seeds did not answer and there is no cached view")
        return relays

    def known_s(self) -> dict[bytes, float]:
        """How long the DHT view has known each relay (a directory file has no history: every relay is new)."""
        return self.discovery.known_s() if self.discovery is not None and self.directory is None else {}

    def close(self) -> None:
        self._drop_tunnel()
        self._stop_discovery()

    def _start_discovery(self, seeds: list[Seed], cache: Path) -> None:
        self.discovery = ClientDiscovery(seeds, cache, self_ids=self._own_ids,
                                         private_network=self.config.private_network)
        self.discovery.load_cache()
        self._view_ready = asyncio.Event()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh(self.discovery))

    async def _refresh(self, discovery: ClientDiscovery) -> None:
        """Keep the DHT view fresh: crawl now (the cache already gave a view to start from), then every
        VIEW_REFRESH_S.  A failed crawl keeps the last good view."""
        while True:
            try:
                await discovery.refresh()
            except Exception:
                log.exception("network view refresh failed; keeping the last good view")
            self._view_ready.set()
            await asyncio.sleep(VIEW_REFRESH_S)

    def _stop_discovery(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self.discovery is not None:
            self.discovery.close()
            self.discovery = None

    def _drop_tunnel(self) -> None:
        """The old tunnel puts routes, kill switch, DNS and device back and ends its helper session; a
        --helper-fd it never used goes to the next one."""
        if self.tunnel is not None:
            if self.tunnel.helper_fd is not None:
                self._helper_fd = self.tunnel.helper_fd
            self.tunnel.shutdown()
            self.tunnel = None
