"""``genie-sima play``: play the levels of a world bundle in a browser.

A small aiohttp app serves one page (``play_page.html``, shipped next to this module) and a WebSocket
at ``/ws``. Every socket gets its own one-env ``World`` over the shared bundle; key presses arrive as
actions, each step's frame, mission, reward, return, episode step, latent action and level id go back.

Protocol (JSON text messages):

    client -> server   {"type": "action", "action": <index or action name>}
                       {"type": "reset"}        restart the current level
                       {"type": "new_level"}    start the next level of the set
    server -> client   {"type": "hello", "actions": [...], ...}     once, when the socket opens
                       {"type": "frame", "frame": <base64 of raw RGB bytes>, ...}
                       {"type": "error", "message": "..."}          a bad message; the socket stays open

After an episode ends (terminated or truncated), the next action starts the next level, as the
World's autoreset would.

The server binds 127.0.0.1 unless another host is asked for; requests whose Host header is not a
loopback name (DNS rebinding) or whose Origin is another site are refused. Model work runs on one
worker thread (the World and the bundle are not thread-safe), so the event loop stays responsive.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import dataclasses
import errno
import hashlib
import ipaddress
import json
import logging
import math
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError

log = logging.getLogger(__name__)

PAGE_RESOURCE = "play_page.html"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_EPISODE_STEPS = 64
MAX_MESSAGE_CHARS = 1024  # longer text messages get an error reply (the socket stays open)
MAX_FRAME_BYTES = 64 * 1024  # aiohttp closes the socket (1009) on larger frames
MAX_CLIENTS = 8  # open sockets at a time; each holds a World
DEFAULT_IDLE_TIMEOUT_S = 300.0  # a socket that sends nothing for this long is closed, freeing its place
IDLE_CLOSE_CODE = 4000  # WebSocket close code (application range) for "idle too long"
MESSAGE_TYPES = ("action", "reset", "new_level")
PAGE_KEYS = {"reset": "r", "new_level": "n"}  # handled by the page itself, never given to an action

# Keys for well-known action names (BabyAI/MiniGrid, Atari); every action also gets a digit (first 10)
# and a clickable entry in the page's legend.
NAMED_KEYS = {"left": "ArrowLeft", "right": "ArrowRight", "forward": "ArrowUp", "up": "ArrowUp",
              "down": "ArrowDown", "pickup": "p", "drop": "d", "toggle": "t", "done": "Enter", "fire": " ",
              "noop": "."}
KEY_LABELS = {"ArrowLeft": "\u2190", "ArrowRight": "\u2192", "ArrowUp": "\u2191", "ArrowDown": "\u2193",
              " ": "Space", "Enter": "Enter"}


class MessageError(ValueError):
    """A client message the server cannot act on; its text goes back to the page."""


def key_bindings(action_names: list[str]) -> list[dict]:
    """For each action: its index, name, keys (``KeyboardEvent.key`` values) and their labels."""
    used: set[str] = set(PAGE_KEYS.values())
    out = []
    for i, name in enumerate(action_names):
        keys = []
        named = NAMED_KEYS.get(str(name).lower())
        if named is not None and named not in used:
            keys.append(named)
        if i < 10:
            keys.append(str((i + 1) % 10))
        used.update(keys)
        out.append({"index": i, "name": str(name), "keys": keys, "labels": [KEY_LABELS.get(k, k) for k in keys]})
    return out


def _reject_constant(name: str):
    raise MessageError(f"message is not valid JSON: {name} is not allowed")


def parse_message(raw, action_names: list[str]) -> tuple[str, int | None]:
    """Validate one client message: ``(type, action index or None)``, or ``MessageError``."""
    if not isinstance(raw, str):
        raise MessageError("binary messages are not accepted; send JSON text such as {\"type\": \"reset\"}")
    if len(raw) > MAX_MESSAGE_CHARS:
        raise MessageError(f"message is {len(raw)} characters long; at most {MAX_MESSAGE_CHARS} are accepted")
    try:
        msg = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as e:  # json.JSONDecodeError is a ValueError; so is our MessageError
        if isinstance(e, MessageError):
            raise
        raise MessageError(f"message is not valid JSON ({e.msg} at character {e.pos}): {raw[:60]!r}") from None
    except RecursionError:
        raise MessageError("message is not valid JSON: nested too deeply") from None
    if not isinstance(msg, dict):
        raise MessageError(f"message must be a JSON object with a \"type\" field, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise MessageError(f"message type {kind!r} is unknown; expected one of {', '.join(MESSAGE_TYPES)}")
    allowed = {"type", "action"} if kind == "action" else {"type"}
    extra = sorted(set(msg) - allowed)
    if extra:
        raise MessageError(f"{kind!r} message has unknown fields {extra}; it takes only {sorted(allowed)}")
    if kind != "action":
        return kind, None
    if "action" not in msg:
        raise MessageError("'action' message lacks the \"action\" field (an index or an action name)")
    action = msg["action"]
    choices = ", ".join(f"{i}={n}" for i, n in enumerate(action_names))
    if isinstance(action, bool) or not isinstance(action, (int, str)):
        raise MessageError(f"action {action!r} has type {type(action).__name__}; expected an integer index "
                           f"or an action name ({choices})")
    if isinstance(action, str):
        if action not in action_names:
            raise MessageError(f"action {action[:40]!r} is unknown; the actions are {choices}")
        return kind, action_names.index(action)
    if not 0 <= action < len(action_names):
        raise MessageError(f"action {action} is out of range; expected 0..{len(action_names) - 1} ({choices})")
    return kind, action


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class PlaySession:
    """One player's game: a one-env World over the shared bundle and the level set. Not thread-safe:
    the server calls it from its single model thread only."""

    def __init__(self, bundle, levels, max_episode_steps: int, seed: int):
        from genie_world.world import World

        self.world = World(bundle, 1, max_episode_steps=max_episode_steps, seed=seed)
        self.levels = levels
        self.level_index, self.ret, self.done, self.seq = 0, 0.0, False, 0
        self._single: dict[int, object] = {}  # level index -> a one-level LevelSet (kept: the World reuses pools by identity)

    def start(self, index: int, event: str) -> dict:
        index %= len(self.levels)
        if index not in self._single:
            self._single[index] = self.levels[index]
        s = self.world.reset(self._single[index])
        self.level_index, self.ret, self.done = index, 0.0, False
        return self._frame(s, None, event)

    def reset(self) -> dict:
        return self.start(self.level_index, "reset")

    def new_level(self) -> dict:
        return self.start(self.level_index + 1, "new_level")

    def act(self, action: int) -> dict:
        if self.done:
            return self.start(self.level_index + 1, "autoreset")
        s = self.world.step([action])
        return self._frame(s, action, "step")

    def _frame(self, s, action: int | None, event: str) -> dict:
        reward = _finite(s.rewards[0]) or 0.0
        self.ret += reward
        terminated, truncated = bool(s.terminated[0]), bool(s.truncated[0])
        self.done = terminated or truncated
        self.seq += 1
        frame = s.frames[0]
        latent = int(s.latent_actions[0])
        return {"type": "frame", "seq": self.seq, "event": event,
                "frame": base64.b64encode(frame.tobytes()).decode("ascii"),
                "height": int(frame.shape[0]), "width": int(frame.shape[1]),
                "mission": s.missions[0], "level_id": s.level_ids[0], "level_index": self.level_index,
                "num_levels": len(self.levels), "step": int(s.episode_steps[0]), "reward": reward,
                "return": self.ret, "latent_action": None if latent < 0 else latent,
                "action": None if action is None else self.world.action_names[action], "action_index": action,
                "terminated": terminated, "truncated": truncated, "done": self.done}


@dataclasses.dataclass
class PlayServer:
    """Handed to ``ready_callback`` once the server listens: where it is, and how to stop it."""

    host: str
    port: int
    url: str
    num_levels: int
    _loop: asyncio.AbstractEventLoop = dataclasses.field(repr=False)
    _stopping: asyncio.Event = dataclasses.field(repr=False)

    def stop(self) -> None:
        """Stop serving (thread-safe); ``serve_play`` then returns."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)


def load_page() -> str:
    return resources.files(__package__).joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def page_headers(page: str) -> dict:
    """A strict Content-Security-Policy allowing exactly the page's own inline script and style."""
    scripts = [_csp_hash(m) for m in re.findall(r"<script>(.*?)</script>", page, re.DOTALL)]
    styles = [_csp_hash(m) for m in re.findall(r"<style>(.*?)</style>", page, re.DOTALL)]
    csp = (f"default-src 'none'; script-src {' '.join(scripts) or chr(39) + 'none' + chr(39)}; "
           f"style-src {' '.join(styles) or chr(39) + 'none' + chr(39)}; connect-src 'self'; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


def _url_host(host: str) -> str:
    if _is_unspecified(host):
        host = "::1" if ":" in host else "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:
        return None


class _App:
    """The aiohttp application and what its handlers share."""

    def __init__(self, bundle, levels, max_episode_steps: int, seed: int, bind_host: str,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S):
        from aiohttp import web

        self.web = web
        self.bundle, self.levels, self.max_episode_steps, self.seed = bundle, levels, max_episode_steps, seed
        self.idle_timeout_s = idle_timeout_s
        self.check_host = _is_loopback(bind_host)
        self.page = load_page()
        self.headers = page_headers(self.page)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="genie-play-model")
        self.sockets: set = set()
        from genie_world.world import World

        # Build one World now so a bundle that cannot make one fails at start-up, not on the first connect.
        self.action_names = list(World(bundle, 1, max_episode_steps=max_episode_steps).action_names)
        self.hello = {"type": "hello", "actions": key_bindings(self.action_names), "page_keys": PAGE_KEYS,
                      "num_levels": len(levels), "prompt": levels.prompt, "bundle": Path(str(bundle.path)).name,
                      "max_episode_steps": max_episode_steps}

        @web.middleware
        async def guard(request, handler):
            return await self._guard(request, handler)

        self.app = web.Application(middlewares=[guard])
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/ws", self._socket)
        self.app.on_shutdown.append(self._close_sockets)

    async def _guard(self, request, handler):
        """Refuse other sites' pages (Origin) and, on loopback, foreign Host names (DNS rebinding)."""
        web = self.web
        host = request.headers.get("Host", "")
        if self.check_host and not _is_loopback(_hostname(host) or ""):
            return web.Response(status=421, text=f"Host {host!r} is not served here; open http://127.0.0.1:<port>/\n")
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != host:
            return web.Response(status=403, text=f"requests from origin {origin!r} are refused\n")
        return await handler(request)

    async def _index(self, request):
        return self.web.Response(text=self.page, content_type="text/html", charset="utf-8", headers=self.headers)

    async def _send(self, ws, obj: dict) -> None:
        await ws.send_str(json.dumps(obj, allow_nan=False))

    async def _error(self, ws, message: str) -> None:
        await self._send(ws, {"type": "error", "message": message})

    async def _socket(self, request):
        web = self.web
        from aiohttp import WSMsgType

        from genie_world.world import InvalidActionError

        if len(self.sockets) >= MAX_CLIENTS:
            return web.Response(status=503, text=f"{MAX_CLIENTS} players are connected already; try again later\n")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_FRAME_BYTES)
        self.sockets.add(ws)  # before the first await, so MAX_CLIENTS holds under concurrent connects
        loop = asyncio.get_running_loop()

        async def run(fn, *args):
            return await loop.run_in_executor(self.executor, fn, *args)

        try:
            await ws.prepare(request)
            session = await run(PlaySession, self.bundle, self.levels, self.max_episode_steps, self.seed)
            await self._send(ws, self.hello)
            await self._send(ws, await run(session.start, 0, "reset"))
            while True:
                try:
                    msg = await ws.receive(timeout=self.idle_timeout_s)
                except asyncio.TimeoutError:
                    # Idle sockets otherwise held their place forever: MAX_CLIENTS idle pages locked everyone out.
                    await self._error(ws, f"no message for {self.idle_timeout_s:g} s; closing (reload to play again)")
                    await ws.close(code=IDLE_CLOSE_CODE, message=b"idle")
                    break
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break  # CLOSE/CLOSED, or ERROR (e.g. a frame over MAX_FRAME_BYTES): aiohttp closes the socket
                try:
                    kind, action = parse_message(msg.data, self.action_names)
                except MessageError as e:
                    await self._error(ws, str(e))
                    continue
                try:
                    if kind == "action":
                        out = await run(session.act, action)
                    elif kind == "reset":
                        out = await run(session.reset)
                    else:
                        out = await run(session.new_level)
                except InvalidActionError as e:
                    await self._error(ws, str(e))
                    continue
                except Exception as e:  # one bad step must not end the game or the server
                    log.exception("play: %s failed", kind)
                    await self._error(ws, f"the server failed to run {kind!r}: {type(e).__name__}: {e}")
                    continue
                await self._send(ws, out)
        except ConnectionResetError:
            pass  # the page went away mid-send
        finally:
            self.sockets.discard(ws)
        return ws

    async def _close_sockets(self, app) -> None:
        from aiohttp import WSCloseCode

        for ws in list(self.sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def load_play_levels(bundle, prompt: str | None, level_file, num_levels: int, seed: int):
    """The level set to play: generated from ``prompt`` or read from ``level_file`` (exactly one)."""
    if (prompt is None) == (level_file is None):
        words = " ".join(bundle.vocab.words[1:]) if bundle.vocab is not None else "?"
        raise ConfigError(f"give exactly one of --prompt (words: {words}) or --level FILE")
    if level_file is None and (isinstance(num_levels, bool) or not isinstance(num_levels, int)
                               or not 1 <= num_levels <= 100_000):
        raise ConfigError(f"num_levels {num_levels!r}: expected an integer in 1..100000")
    from genie_world.world_builder import WorldBuilder

    return WorldBuilder(bundle).resolve(prompt=prompt, level_file=level_file, num_worlds=num_levels, seed=seed)


async def _serve(app: _App, host: str, port: int, ready_callback) -> None:
    from aiohttp import web

    # Open sockets get 2 s to finish on shutdown (aiohttp waits 60 s by default).
    runner = web.AppRunner(app.app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]  # (host, port) or (host, port, flow, scope) for IPv6
        server = PlayServer(str(bound[0]), int(bound[1]), f"http://{_url_host(host)}:{int(bound[1])}/",
                            len(app.levels), asyncio.get_running_loop(), asyncio.Event())
        interrupted = _stop_on_sigint(server)
        if ready_callback is not None:
            ready_callback(server)
        await server._stopping.wait()
    finally:
        await runner.cleanup()
        app.executor.shutdown(wait=True, cancel_futures=True)
    if interrupted():
        raise KeyboardInterrupt  # Ctrl+C, after a clean shutdown


def _stop_on_sigint(server: PlayServer) -> Callable[[], bool]:
    """Ctrl+C stops ``server``; returns whether it did. ``asyncio.run``'s own SIGINT handler is a plain Python
    handler, and the kernel may hand SIGINT to any thread (torch's OpenMP workers, the model's executor): the
    main thread then sleeps on in the selector and never runs it. ``add_signal_handler`` also sets the
    loop's wakeup fd, so the signal wakes the selector whichever thread receives it."""
    import signal
    import threading

    seen = []
    if threading.current_thread() is not threading.main_thread():
        return lambda: False  # serve_play in a thread (tests, notebooks): stop() only
    loop = server._loop

    def on_sigint():
        seen.append(True)
        server._stopping.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl+C interrupts the shutdown itself

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    return lambda: bool(seen)


def serve_play(bundle_path, prompt: str | None = None, level_file=None, host: str = DEFAULT_HOST,
               port: int = DEFAULT_PORT, num_levels: int = 16, seed: int = 0,
               max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
               ready_callback: Callable[[PlayServer], None] | None = None) -> None:
    """Serve the play page until ``PlayServer.stop()`` (given to ``ready_callback``) or Ctrl+C.

    ``port=0`` picks a free port; the real one is in the ``PlayServer`` given to ``ready_callback``.
    """
    from genie_world.bundle import load_bundle

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port {port!r}: expected an integer in 0..65535 (0 picks a free port)")
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or not 1 <= max_episode_steps <= 100_000:
        raise ConfigError(f"max_episode_steps {max_episode_steps!r}: expected an integer in 1..100000")
    if isinstance(idle_timeout_s, bool) or not isinstance(idle_timeout_s, (int, float)) or not 0 < idle_timeout_s <= 86400:
        raise ConfigError(f"idle_timeout_s {idle_timeout_s!r}: expected seconds in (0, 86400]")
    bundle = load_bundle(bundle_path)
    levels = load_play_levels(bundle, prompt, level_file, num_levels, seed)
    app = _App(bundle, levels, max_episode_steps, seed, host, float(idle_timeout_s))
    asyncio.run(_serve(app, host, port, ready_callback))


# --- command line -----------------------------------------------------------------------------
def add_play_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, metavar="RUN", help="a world bundle (`genie-sima pretrain --out`)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="generate the levels from this sentence (words of the bundle's vocabulary)")
    src.add_argument("--level", metavar="FILE", help="play a level file written by `genie-sima generate`")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the page to your network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--num-levels", type=int, default=16, help="levels to generate from --prompt (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated levels and the world (default 0)")
    parser.add_argument("--max-episode-steps", type=int, default=DEFAULT_MAX_EPISODE_STEPS,
                        help=f"episode time limit (default {DEFAULT_MAX_EPISODE_STEPS})")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
                        help=f"close a page's socket after this long without a message, freeing one of the "
                             f"{MAX_CLIENTS} places (default {DEFAULT_IDLE_TIMEOUT_S:g})")


def run_play(args: argparse.Namespace, out=None) -> int:
    """The ``play`` subcommand: serve until Ctrl+C. User errors are raised as ``ConfigError``."""
    from genie_world.bundle import BundleError
    from genie_world.levels import LevelFileError
    from genie_world.text_encoder import UnknownWordsError

    out = out or sys.stdout

    def ready(server: PlayServer) -> None:
        print(f"genie-sima play: {server.num_levels} levels of {args.bundle} at {server.url}  (Ctrl+C to stop)",
              file=out, flush=True)
        if not _is_loopback(args.host):
            print(f"genie-sima play: warning: listening on {args.host}: anyone who can reach this machine can "
                  "play (there is no authentication)", file=out, flush=True)

    try:
        serve_play(args.bundle, prompt=args.prompt, level_file=args.level, host=args.host, port=args.port,
                   num_levels=args.num_levels, seed=args.seed, max_episode_steps=args.max_episode_steps,
                   idle_timeout_s=args.idle_timeout, ready_callback=ready)
    except (BundleError, LevelFileError, UnknownWordsError) as e:
        raise ConfigError(str(e)) from e
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; "
                              "pick another --port (0 picks a free one)") from e
        raise
    except KeyboardInterrupt:
        print("genie-sima play: stopped", file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.play``: the same as ``genie-sima play``."""
    parser = argparse.ArgumentParser(prog="genie-sima play", description="play a world bundle's levels in a browser")
    add_play_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_play(args)
    except ConfigError as e:
        print(f"genie-sima play: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
