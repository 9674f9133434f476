"""Live reload of policy and mapping files: on SIGHUP and when the files change.

A reload reads and validates every file again (in a worker thread: the event loop never waits on
the disk or the parser), then swaps the new :class:`Policy` in with one attribute assignment. A
request keeps the policy object it started with, so in-flight requests finish under the old one.
A file that does not load leaves the last good policy in force; the errors are logged and kept in
:attr:`PolicyReloader.status` (readiness details and metrics read it).

Change detection polls ``stat()`` of the policy files, their directories' listings and the
mapping tables they name. A change is loaded once the files have stayed the same for one poll
interval, so an editor that writes a file in several steps is not caught half-way (writing a new
file and renaming it over the old one is still the safe way to edit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurmproxy.errors import PolicyError
from slurmproxy.policy.loader import POLICY_SUFFIXES
from slurmproxy.policy.rules import Policy

logger = logging.getLogger("slurmproxy.policy")
Fingerprint = tuple[tuple[str, int, int, int] | tuple[str], ...]


@dataclass
class ReloadStatus:
    """What the last reloads did. Counters only grow; times are UNIX seconds."""

    ok: bool = True
    digest: str = ""
    rules: int = 0
    loaded_at: float = 0.0
    last_attempt_at: float = 0.0
    last_trigger: str = "start"
    errors: list[str] = field(default_factory=list)
    reloads: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "stale: the last reload failed; the previous policy is in force",
            "rules": self.rules,
            "digest": self.digest,
            "loaded_at": round(self.loaded_at, 3),
            "last_attempt_at": round(self.last_attempt_at, 3),
            "last_trigger": self.last_trigger,
            "reloads": self.reloads,
            "failures": self.failures,
            "errors": list(self.errors),
        }


def _stat(path: Path) -> tuple[str, int, int, int] | tuple[str]:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path),)
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


def fingerprint(paths: Sequence[Path], inputs: Sequence[str]) -> Fingerprint:
    """Stat data of every configured path, every policy file in a configured directory, and every input."""
    seen: list[Path] = []
    for path in paths:
        if not path.is_dir():
            seen.append(path)
            continue
        with contextlib.suppress(OSError):  # a directory's own mtime also moves for files that are not policies
            seen.extend(sorted(p for p in path.iterdir() if p.suffix in POLICY_SUFFIXES))
    seen.extend(Path(p) for p in inputs)
    return tuple(_stat(p) for p in dict.fromkeys(seen))


class PolicyReloader:
    """Reloads the policy with ``load`` and hands every new good one to ``apply``."""

    def __init__(
        self,
        paths: Sequence[Path],
        load: Callable[[], Policy],
        apply: Callable[[Policy], None],
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
        observe: Callable[[bool, int | None], None] | None = None,
    ) -> None:
        self._observe = observe  # told every reload's outcome (ok, rules): the metrics
        self._paths = list(paths)
        self._load = load
        self._apply = apply
        self._clock = clock
        self._lock = asyncio.Lock()
        self._inputs = policy.inputs
        self._loaded = fingerprint(self._paths, self._inputs)
        now = clock()
        self.status = ReloadStatus(digest=policy.digest, rules=len(policy.rules), loaded_at=now, last_attempt_at=now)

    def current_fingerprint(self) -> Fingerprint:
        return fingerprint(self._paths, self._inputs)

    def _loaded_ok(self, policy: Policy, seen: Fingerprint, trigger: str) -> None:
        if policy.inputs != self._inputs:  # a new mapping table: watch it too
            self._inputs = policy.inputs
            seen = fingerprint(self._paths, self._inputs)
        self._loaded = seen
        changed = policy.digest != self.status.digest
        self._apply(policy)
        now = self._clock()
        self.status.ok, self.status.errors = True, []
        self.status.digest, self.status.rules, self.status.loaded_at = policy.digest, len(policy.rules), now
        self.status.reloads += 1
        if self._observe is not None:
            self._observe(True, len(policy.rules))
        logger.info(
            "policy reloaded (%s): %d rule(s), digest %s%s",
            trigger,
            len(policy.rules),
            policy.digest,
            "" if changed else " (unchanged)",
        )
        for warning in policy.warnings:
            logger.warning("policy: %s", warning)

    def _failed(self, errors: list[str], seen: Fingerprint, trigger: str) -> None:
        self._loaded = seen
        self.status.ok, self.status.errors = False, errors
        self.status.failures += 1
        if self._observe is not None:
            self._observe(False, None)
        logger.error(
            "policy reload (%s) failed; keeping the policy loaded at %s (digest %s):\n%s",
            trigger,
            time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.status.loaded_at)),
            self.status.digest,
            "\n".join(errors),
        )

    async def reload(self, trigger: str) -> bool:
        """Load the files now; True if a new policy is in force. Never raises for a bad file."""
        async with self._lock:
            self.status.last_attempt_at, self.status.last_trigger = self._clock(), trigger
            seen = await asyncio.to_thread(self.current_fingerprint)
            try:
                policy = await asyncio.to_thread(self._load)
            except PolicyError as exc:
                self._failed(exc.errors, seen, trigger)
                return False
            except Exception as exc:  # a reload must never take the proxy down
                logger.exception("policy reload (%s) failed unexpectedly", trigger)
                self._failed([f"unexpected error: {type(exc).__name__}: {exc}"], seen, trigger)
                return False
            self._loaded_ok(policy, seen, trigger)
            return True

    async def watch(self, interval: float) -> None:
        """Poll for changes forever; reload a change once it has been stable for one interval."""
        previous = self._loaded
        while True:
            await asyncio.sleep(interval)
            try:
                now = await asyncio.to_thread(self.current_fingerprint)
            except Exception:  # pragma: no cover - stat errors are caught inside; be safe
                logger.exception("cannot check the policy files for changes")
                continue
            if now != self._loaded and now == previous:
                await self.reload("file change")
            previous = now


@contextlib.asynccontextmanager
async def reloading(reloader: PolicyReloader, interval: float) -> AsyncIterator[PolicyReloader]:
    """Run the watcher (if ``interval`` > 0) and the SIGHUP handler for as long as the context lasts."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[bool]] = set()

    def on_sighup() -> None:
        task = loop.create_task(reloader.reload("SIGHUP"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    handler_installed = False
    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        handler_installed = True
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals here
        logger.debug("SIGHUP reload not available in this thread; watching files only")
    watcher = loop.create_task(reloader.watch(interval)) if interval > 0 else None
    try:
        yield reloader
    finally:
        if handler_installed:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in [watcher, *tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [watcher, *tasks] if t is not None), return_exceptions=True)
