"""The play page: a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
plays a random-weight bundle through the WebSocket; bad messages get an error on the page while the
server keeps serving; the server listens on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.play import DEFAULT_HOST, MAX_MESSAGE_CHARS, MessageError, key_bindings, parse_message, serve_play

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "run `bash scripts/install_browser.sh` (as root) to install Debian's chromium and chromium-driver"
BABYAI = ["left", "right", "forward", "pickup", "drop", "toggle", "done"]
PROMPT = "go to the red ball"
WAIT_S = 15


# --- message validation and key bindings (no browser) ------------------------------------------
@pytest.mark.parametrize("raw, problem", [
    ("not json", "not valid JSON"),
    ("", "not valid JSON"),
    ('{"type": "action", "action": NaN}', "NaN is not allowed"),
    ("[1, 2]", "must be a JSON object"),
    ('"reset"', "must be a JSON object"),
    ('{"action": 1}', "type None is unknown"),
    ('{"type": "jump"}', "type 'jump' is unknown"),
    ('{"type": 3}', "type 3 is unknown"),
    ('{"type": "action"}', 'lacks the "action" field'),
    ('{"type": "action", "action": 99}', "out of range; expected 0..6"),
    ('{"type": "action", "action": -1}', "out of range"),
    ('{"type": "action", "action": 1.0}', "has type float"),
    ('{"type": "action", "action": true}', "has type bool"),
    ('{"type": "action", "action": null}', "has type NoneType"),
    ('{"type": "action", "action": [2]}', "has type list"),
    ('{"type": "action", "action": "jump"}', "'jump' is unknown; the actions are 0=left"),
    ('{"type": "action", "action": 1, "extra": 2}', "unknown fields ['extra']"),
    ('{"type": "reset", "action": 1}', "unknown fields ['action']"),
    (b'{"type": "reset"}', "binary messages are not accepted"),
    ('{"type": "reset", "pad": "' + "x" * MAX_MESSAGE_CHARS + '"}', "characters long"),
    ("[" * 1000, "not valid JSON"),  # deep nesting within the size limit
])
def test_bad_messages_are_refused_with_a_reason(raw, problem):
    with pytest.raises(MessageError, match=re.escape(problem)):
        parse_message(raw, BABYAI)


def test_good_messages():
    assert parse_message('{"type": "action", "action": 2}', BABYAI) == ("action", 2)
    assert parse_message('{"type": "action", "action": "toggle"}', BABYAI) == ("action", 5)
    assert parse_message('{"type": "reset"}', BABYAI) == ("reset", None)
    assert parse_message('{"type": "new_level"}', BABYAI) == ("new_level", None)


def test_key_bindings():
    keys = {b["name"]: b["keys"] for b in key_bindings(BABYAI)}
    assert keys["left"][0] == "ArrowLeft" and keys["right"][0] == "ArrowRight" and keys["forward"][0] == "ArrowUp"
    assert [keys[n][0] for n in ("pickup", "drop", "toggle", "done")] == ["p", "d", "t", "Enter"]
    atari = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN"] + [f"A{i}" for i in range(12)]
    bound = key_bindings(atari)
    flat = [k for b in bound for k in b["keys"]]
    assert len(flat) == len(set(flat)), "a key is bound to two actions"
    assert "r" not in flat and "n" not in flat, "reset/new-level keys must stay free"
    assert bound[3]["keys"] == ["ArrowRight", "4"] and bound[17]["keys"] == []  # clickable in the legend only


# --- a live server ------------------------------------------------------------------------------
class ServerThread:
    """serve_play on a background thread; ``server`` is the PlayServer it reports when listening."""

    def __init__(self, bundle, **kwargs):
        self.ready = threading.Event()
        self.server = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(bundle,), kwargs=kwargs, daemon=True,
                                       name="play-server")

    def _run(self, bundle, **kwargs):
        def ready(server):
            self.server = server
            self.ready.set()

        try:
            serve_play(bundle, ready_callback=ready, **kwargs)
        except BaseException as e:  # noqa: BLE001 - surfaced by start()
            self.error = e
            self.ready.set()

    def start(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(60), "play server did not start in 60 s"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.thread.join(20)
        assert not self.thread.is_alive(), "play server did not stop"


@pytest.fixture(scope="module")
def play_server(random_bundle):
    # host left at its default on purpose: test_binds_loopback_by_default checks it.
    srv = ServerThread(random_bundle, prompt=PROMPT, port=0, num_levels=4, max_episode_steps=200).start()
    yield srv.server
    srv.stop()


def _chromium_options(profile_dir: Path):
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    opts.binary_location = CHROMIUM
    # What this closed network needs (see the machine notes): no sandbox as root, no background fetches.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
                 "--window-size=1000,800", f"--user-data-dir={profile_dir}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return opts


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed in this environment: pip install selenium", pytrace=False)
    # An explicit driver path: Selenium Manager (which would try to download a driver) never runs.
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=_chromium_options(tmp_path_factory.mktemp("chromium-profile")))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _wait(driver, predicate, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: predicate(d))
    except TimeoutException:
        state = {i: _text(driver, i) for i in ("status", "seq", "step", "level", "error")}
        raise AssertionError(f"timed out waiting for {what}; page shows {state}") from None


def _seq(driver) -> int:
    return int(_text(driver, "seq") or 0)


def _canvas(driver) -> str:
    return driver.execute_script("return document.getElementById('frame').toDataURL('image/png');")


def _press(driver, key) -> dict:
    """Press a key on the page and wait for the frame it causes; returns the page's last frame message."""
    from selenium.webdriver.common.action_chains import ActionChains

    before = _seq(driver)
    ActionChains(driver).send_keys(key).perform()
    _wait(driver, lambda d: _seq(d) > before, f"a frame after pressing {key!r}")
    return driver.execute_script("const f = window.geniePlay.lastFrame; return {...f, frame: null};")


def _open(driver, server) -> None:
    driver.get(server.url)
    _wait(driver, lambda d: _seq(d) >= 1 and _text(d, "status") == "connected", "the first frame")


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def test_page_plays_with_the_keyboard(browser, play_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    t0 = time.perf_counter()
    _open(browser, play_server)
    assert _text(browser, "mission") == PROMPT
    assert _text(browser, "step") == "0"
    assert _text(browser, "latent") == "\u2014"  # no action taken yet
    level0 = _text(browser, "level")
    assert level0.endswith("-0") and _text(browser, "level-index") == "(1 of 4)"
    legend = browser.find_element(By.ID, "legend").text
    for name in BABYAI:
        assert name in legend, f"legend lacks {name!r}: {legend!r}"
    first = _canvas(browser)
    assert browser.execute_script("return getComputedStyle(document.getElementById('frame')).imageRendering;") \
        == "pixelated"

    # The random reward head often says "terminated": the action after that starts the next level.
    frames, starts, stepped, done = [first], {level0: first}, 0, False
    for key, name in ((Keys.ARROW_UP, "forward"), (Keys.ARROW_LEFT, "left"), (Keys.ARROW_RIGHT, "right"),
                      ("p", "pickup"), ("t", "toggle"), ("3", "forward")):
        msg = _press(browser, key)
        frames.append(_canvas(browser))
        if done:
            assert msg["event"] == "autoreset" and msg["step"] == 0 and msg["action"] is None, msg
            starts.setdefault(msg["level_id"], frames[-1])
        else:
            assert msg["event"] == "step" and msg["action"] == name, msg
            assert _text(browser, "action") == name
            assert msg["step"] >= 1 and _text(browser, "step") == str(msg["step"])
            assert _text(browser, "latent") == str(msg["latent_action"]) and msg["latent_action"] >= 0
            stepped += 1
        assert _text(browser, "level") == msg["level_id"]
        assert float(_text(browser, "reward")) == pytest.approx(msg["reward"], abs=1e-3)
        assert float(_text(browser, "return")) == pytest.approx(msg["return"], abs=1e-3)
        done = msg["done"]
    assert stepped >= 3
    assert len(set(frames)) > 1, "the canvas never changed while playing"

    level = _text(browser, "level")
    before = _seq(browser)
    browser.find_element(By.ID, "reset").click()
    _wait(browser, lambda d: _seq(d) > before, "the frame after Reset")
    assert _text(browser, "level") == level and _text(browser, "step") == "0"
    assert _text(browser, "return") == "0.000" and _text(browser, "latent") == "\u2014"
    assert _canvas(browser) == starts.get(level, _canvas(browser)), "Reset must restart the same level"

    index = int(re.match(r"\((\d+) of 4\)", _text(browser, "level-index")).group(1))
    before = _seq(browser)
    browser.find_element(By.ID, "new-level").click()
    _wait(browser, lambda d: _seq(d) > before, "the frame after New level")
    assert _text(browser, "level") != level and _text(browser, "step") == "0"
    assert _text(browser, "level-index") == f"({index % 4 + 1} of 4)"
    assert _text(browser, "error") == ""
    assert _console_errors(browser) == []  # e.g. no Content-Security-Policy violations
    assert time.perf_counter() - t0 < 30


def test_bad_messages_show_an_error_and_the_server_keeps_serving(browser, play_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    t0 = time.perf_counter()
    _open(browser, play_server)
    bad = [('{"type":"action","action":99}', "out of range"),
           ("this is not JSON", "not valid JSON"),
           ('{"type":"action","action":"fly"}', "'fly' is unknown"),
           ('{"type":"teleport"}', "'teleport' is unknown"),
           ('{"type":"action","action":2.5}', "has type float")]
    for raw, problem in bad:
        browser.execute_script("window.geniePlay.socket.send(arguments[0]);", raw)
        _wait(browser, lambda d, problem=problem: problem in _text(d, "error"), f"the error for {raw!r}")
        assert browser.execute_script("return window.geniePlay.socket.readyState;") == 1, "socket was closed"
    # The page's own sender validates nothing: an unknown action index from it also gets an error.
    browser.execute_script("window.geniePlay.socket.send(JSON.stringify({type: 'action', action: -3}));")
    _wait(browser, lambda d: "out of range" in _text(d, "error"), "the error for action -3")

    before = _seq(browser)
    browser.find_element(By.ID, "reset").click()
    _wait(browser, lambda d: _seq(d) > before, "the frame after Reset")
    msg = _press(browser, Keys.ARROW_UP)
    assert msg["event"] == "step" and msg["step"] == 1, msg
    assert _text(browser, "error") == "", "a good frame clears the error"
    # A second page still connects: the server itself is fine.
    browser.execute_script("window.open(arguments[0], '_blank');", play_server.url)
    browser.switch_to.window(browser.window_handles[-1])
    _wait(browser, lambda d: _seq(d) >= 1, "the first frame in a second tab")
    browser.close()
    browser.switch_to.window(browser.window_handles[0])
    assert time.perf_counter() - t0 < 30


def test_episode_end_then_next_action_starts_the_next_level(random_bundle, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    srv = ServerThread(random_bundle, prompt=PROMPT, port=0, num_levels=3, max_episode_steps=2).start()
    try:
        _open(browser, srv.server)
        msg = _press(browser, Keys.ARROW_UP)
        if not msg["done"]:  # the random termination head may end the episode at step 1 already
            msg = _press(browser, Keys.ARROW_UP)
            assert msg["done"] and msg["step"] == 2 and (msg["terminated"] or msg["truncated"]), msg
        assert "episode over" in _text(browser, "episode")
        assert "done" in browser.find_element(By.ID, "frame").get_attribute("class")
        msg = _press(browser, Keys.ARROW_LEFT)
        assert msg["event"] == "autoreset" and msg["step"] == 0 and msg["level_index"] == 1, msg
        assert _text(browser, "episode") == ""
    finally:
        srv.stop()


def test_binds_loopback_by_default(play_server):
    import psutil

    assert inspect.signature(serve_play).parameters["host"].default == DEFAULT_HOST == "127.0.0.1"
    listening = [c for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == play_server.port]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"], listening
    assert play_server.host == "127.0.0.1" and play_server.url == f"http://127.0.0.1:{play_server.port}/"


def test_refuses_other_origins_and_hosts(play_server):
    import aiohttp

    async def probe():
        async with aiohttp.ClientSession() as c:
            async with c.get(play_server.url) as r:
                assert r.status == 200 and "default-src 'none'" in r.headers["Content-Security-Policy"]
            async with c.get(play_server.url, headers={"Host": "attacker.example"}) as r:
                assert r.status == 421  # DNS rebinding
            async with c.get(play_server.url + "ws", headers={"Origin": "http://attacker.example"}) as r:
                assert r.status == 403  # another site's page
            async with c.ws_connect(play_server.url + "ws") as ws:  # no Origin (not a browser): allowed
                assert (await ws.receive_json())["type"] == "hello"
                assert (await ws.receive_json())["type"] == "frame"
                await ws.send_bytes(b"\x00")
                assert "binary" in (await ws.receive_json())["message"]

    asyncio.run(asyncio.wait_for(probe(), 30))


def test_idle_sockets_are_closed_and_their_places_freed(random_bundle):
    """MAX_CLIENTS idle pages used to lock everyone else out for good: each is closed after the idle timeout."""
    import aiohttp

    from pipelines.play import IDLE_CLOSE_CODE, MAX_CLIENTS

    srv = ServerThread(random_bundle, prompt=PROMPT, port=0, num_levels=2, idle_timeout_s=3.0).start()

    async def probe():
        async with aiohttp.ClientSession() as c:
            idle = [await c.ws_connect(srv.server.url + "ws") for _ in range(MAX_CLIENTS)]
            for ws in idle:
                assert (await ws.receive_json())["type"] == "hello"
            async with c.get(srv.server.url + "ws") as r:
                assert r.status == 503  # full
            active = idle[0]
            for _ in range(4):  # a page that keeps playing keeps its place
                await asyncio.sleep(1.0)
                await active.send_str("reset")
            for ws in idle[1:]:
                msgs = [m async for m in ws]  # the server's last words, then the close
                assert any("no message for 3 s; closing" in (m.data or "") for m in msgs if m.type == aiohttp.WSMsgType.TEXT), msgs
                assert ws.close_code == IDLE_CLOSE_CODE
            assert not active.closed
            async with c.ws_connect(srv.server.url + "ws") as ws:  # a new page gets in
                assert (await ws.receive_json())["type"] == "hello"
            for ws in idle:
                await ws.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), 60))
    finally:
        srv.stop()


def _play_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipelines.play", *args]


# Linux's tgkill: a signal to one chosen thread (os.kill hands it to whichever thread the kernel picks).
_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


def _sigint_to_a_worker_thread(pid: int) -> None:
    """SIGINT delivered to a thread of ``pid`` other than its main thread (torch's OpenMP workers exist once
    the World has run): what the kernel sometimes does with a Ctrl+C, and what used to leave play running."""
    import ctypes

    workers = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert workers, "play runs no thread besides its main one"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(_TGKILL, pid, max(workers), signal.SIGINT) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.parametrize("receiver", ["the process", "a worker thread"])
def test_command_prints_the_url_and_stops_on_ctrl_c(random_bundle, receiver):
    import urllib.request

    if receiver == "a worker thread" and (_TGKILL is None or not Path("/proc/self/task").is_dir()):
        pytest.skip("needs Linux's tgkill on x86_64 or aarch64")
    # PYTHONFAULTHANDLER: if Ctrl+C does not stop it, SIGABRT makes it print every thread's stack.
    # OMP_NUM_THREADS=2: torch's OpenMP worker threads exist whatever the environment running the suite sets
    # (1 means no worker threads, and then the "worker thread" case would test nothing).
    proc = subprocess.Popen(_play_cmd("--bundle", str(random_bundle), "--prompt", PROMPT, "--port", "0",
                                      "--num-levels", "2"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "2"})
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
        assert m and int(m.group(2)) > 0, (line, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(m.group(1), timeout=10) as r:
            assert r.status == 200 and b'id="frame"' in r.read()
        if receiver == "the process":
            proc.send_signal(signal.SIGINT)
        else:
            _sigint_to_a_worker_thread(proc.pid)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"play did not stop within 60 s of SIGINT; its threads:\n{err[-8000:]}")
        assert proc.returncode == 0, err
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_errors_are_one_clear_line(random_bundle, tmp_path):
    r = subprocess.run(_play_cmd("--bundle", str(random_bundle), "--prompt", "go to the flying saucer",
                                 "--port", "0"), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "unknown words ['flying', 'saucer']" in r.stderr and "vocabulary" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(_play_cmd("--bundle", str(tmp_path), "--prompt", PROMPT), cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and "bundle.json does not exist" in r.stderr and "Traceback" not in r.stderr


def test_page_ships_with_the_package():
    from importlib import resources

    page = resources.files("pipelines").joinpath("play_page.html").read_text(encoding="utf-8")
    for element in ("frame", "mission", "reward", "return", "step", "latent", "level", "error", "reset",
                    "new-level", "legend"):
        assert f'id="{element}"' in page
    assert "innerHTML" not in page  # server text only ever goes in through textContent
