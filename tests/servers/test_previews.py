"""
The live path's pieces one at a time: the throttle every push and write goes through, which task a preview frame
belongs to (a socket is per server, not per user: that attribution is what keeps one user's picture from another
user's window), what happens to a preview on its way out, and what a prompt asks a server about previews.
"""

import asyncio
import base64
import io
import json
import logging
import random
import struct
import uuid
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from comfysim import SimulatorThread
from servers import previews as previews_module
from servers.aio import Throttle
from servers.frames import Binary, Message, parse_frame
from servers.models import Server, ServerState
from servers.previews import Previews
from servers.prompts import Prompts
from servers.tracking import Tracking
from tasks.models import Task
from tests.conftest import wait_for

# --- Throttle ---------------------------------------------------------------------------------------------------


class Recorder:
    """A throttled stream's state and what `send` saw of it, call by call."""

    def __init__(self):
        self.state = 0
        self.sent = []

    async def send(self):
        self.sent.append(self.state)


async def turns(count=3):
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_burst_of_pokes_sends_once_at_once_and_once_more_with_the_newest_state():
    stream = Recorder()
    throttle = Throttle(1.0, stream.send)
    for state in range(1, 101):
        stream.state = state
        throttle.poke()
        if state == 1:
            await turns()
            assert stream.sent == [1]  # the leading edge: the first change goes out at once
    await turns()
    assert stream.sent == [1]  # the other 99 wait for the interval, folded into one
    while len(stream.sent) < 2:
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.5)  # longer than the interval: nothing else was pending
    assert stream.sent == [1, 100]
    throttle.close()


@pytest.mark.asyncio
async def test_after_a_quiet_spell_the_first_poke_sends_at_once():
    stream = Recorder()
    throttle = Throttle(0.1, stream.send)
    stream.state = "first"
    throttle.poke()
    await turns()
    await asyncio.sleep(0.3)  # quiet for longer than the interval
    stream.state = "second"
    throttle.poke()
    await turns()
    assert stream.sent == ["first", "second"]
    throttle.close()


@pytest.mark.asyncio
async def test_flush_sends_the_pending_state_now_and_stops():
    stream = Recorder()
    throttle = Throttle(30.0, stream.send)
    stream.state = 1
    throttle.poke()
    await turns()
    stream.state = 2
    throttle.poke()  # would wait 30 s
    await throttle.flush()
    assert stream.sent == [1, 2]
    await throttle.flush()  # nothing new: nothing sent again
    await turns()
    assert stream.sent == [1, 2]


@pytest.mark.asyncio
async def test_close_drops_the_pending_state():
    stream = Recorder()
    throttle = Throttle(0.1, stream.send)
    stream.state = 1
    throttle.poke()
    await turns()
    stream.state = 2
    throttle.poke()
    throttle.close()
    await asyncio.sleep(0.3)
    assert stream.sent == [1]


@pytest.mark.asyncio
async def test_a_send_that_fails_does_not_stop_the_stream(caplog):
    stream = Recorder()

    async def flaky():
        if stream.state == 1:
            raise RuntimeError("layer down")
        await stream.send()

    throttle = Throttle(0.05, flaky)
    stream.state = 1
    throttle.poke()
    await turns()
    stream.state = 2
    throttle.poke()
    while not stream.sent:
        await asyncio.sleep(0.02)
    assert stream.sent == [2]
    assert "a throttled send failed" in caplog.text
    throttle.close()


# --- which task a binary frame belongs to ------------------------------------------------------------------------

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {}},
    "9": {"class_type": "SaveImageWebsocket", "inputs": {}},
}


def png(size=(64, 64), color=(200, 40, 40)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def type4(prompt_id, node_id="3", image=None):
    blob = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "image_type": "image/png"}).encode()
    return parse_frame(struct.pack(">II", 4, len(blob)) + blob + (image or png()))


def type1(image=None):
    return parse_frame(struct.pack(">II", 1, 2) + (image or png()))


class Ledger:
    """A connection's prompt ledger holding one task of ours, and a Tracking whose previews are recorded."""

    def __init__(self):
        self.prompts = Prompts()
        self.ours = str(uuid.uuid4())
        self.task = SimpleNamespace(pk=uuid.uuid4(), owner_id=1, prompt_id=self.ours, graph=GRAPH)
        self.prompts.tasks[self.ours] = self.task
        self.offered = []
        self.tracking = Tracking(
            SimpleNamespace(name="gpu-a"), self.prompts, guard=None, finish_soon=None,
            preview=lambda task, node_id, frame: self.offered.append((task, node_id, frame)),
            push_interval=1.0, write_interval=1.0,
        )  # fmt: skip


def test_a_type_4_frame_naming_our_prompt_is_offered_for_that_task():
    ledger = Ledger()
    frame = type4(ledger.ours)
    assert isinstance(frame, Binary) and frame.prompt_id == ledger.ours
    ledger.tracking.binary(frame)
    assert [(task, node) for task, node, _ in ledger.offered] == [(ledger.task, "3")]


def test_a_type_4_frame_naming_an_unknown_prompt_is_dropped():
    ledger = Ledger()
    ledger.prompts.running = ledger.ours  # even while ours runs: the frame says whose it is
    ledger.tracking.binary(type4(str(uuid.uuid4())))
    assert ledger.offered == []


def test_a_type_1_frame_goes_to_the_prompt_that_runs_now():
    ledger = Ledger()
    ledger.prompts.running = ledger.ours
    ledger.tracking.binary(type1())
    assert [task for task, _, _ in ledger.offered] == [ledger.task]


def test_a_type_1_frame_while_nothing_of_ours_runs_is_dropped():
    ledger = Ledger()
    assert ledger.prompts.running is None
    ledger.tracking.binary(type1())
    assert ledger.offered == []


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["execution_start", "executing", "progress"])
async def test_once_another_clients_prompt_runs_type_1_frames_are_not_ours(kind):
    ledger = Ledger()
    ledger.prompts.running = ledger.ours
    stranger = str(uuid.uuid4())
    ledger.prompts.stranger(stranger)  # known not to be ours: no database look-up
    await ledger.tracking.handle(Message(kind, {"prompt_id": stranger, "node": "5", "value": 1, "max": 20}))
    assert ledger.prompts.running is None
    ledger.tracking.binary(type1())
    assert ledger.offered == []


def test_a_frame_of_a_prompt_being_finished_is_dropped():
    ledger = Ledger()
    ledger.prompts.running = ledger.ours
    ledger.prompts.finishing.add(ledger.ours)
    ledger.tracking.binary(type4(ledger.ours))
    ledger.tracking.binary(type1())
    assert ledger.offered == []


def test_save_image_websocket_frames_are_still_kept_as_outputs():
    ledger = Ledger()
    image = png(color=(1, 2, 3))
    ledger.tracking.binary(type4(ledger.ours, node_id="9", image=image))
    assert ledger.offered == []
    assert ledger.prompts.ws_images[ledger.ours] == [("9", "image/png", image)]


# --- a preview on its way out --------------------------------------------------------------------------------------


@pytest.fixture
def pushed(monkeypatch):
    facts = []

    async def apush(owner_id, fact):
        facts.append((owner_id, fact))
        return True

    monkeypatch.setattr(previews_module, "apush", apush)
    return facts


def make_previews(ledger, *, previews=True, fps=1000.0):
    server = SimpleNamespace(name="gpu-a", previews=previews)
    return Previews(server, ledger.prompts, fps=lambda: fps)


async def until(predicate, timeout=15.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    pytest.fail("timed out")


def decoded(fact):
    with Image.open(io.BytesIO(base64.b64decode(fact["data"]))) as picture:
        return picture.format, picture.size


@pytest.mark.asyncio
async def test_a_large_preview_reaches_its_owner_as_a_small_webp(pushed):
    ledger = Ledger()
    make_previews(ledger).offer(ledger.task, "3", type4(ledger.ours, image=png(size=(1024, 768))))
    await until(lambda: pushed)
    [(owner, fact)] = pushed
    assert owner == ledger.task.owner_id and fact["owner"] == owner and fact["task"] == str(ledger.task.pk)
    assert fact["mime"] == "image/webp" and (fact["width"], fact["height"]) == (256, 192)
    assert decoded(fact) == ("WEBP", (256, 192))


def test_a_busy_picture_is_sent_smaller_so_that_its_frame_stays_under_30_kb():
    from tasks.live import preview_fact, render_fact

    noise = Image.frombytes("RGB", (512, 512), random.Random(7).randbytes(512 * 512 * 3))  # the worst case
    out = io.BytesIO()
    noise.save(out, "PNG")
    image, mime, size = previews_module.shrink(out.getvalue())
    assert mime == "image/webp" and max(size) < 256  # at 256 px this picture takes about 25 KB of WebP
    fragment = render_fact(preview_fact(uuid.uuid4(), 1, image, mime, size, upstream_at=1.0))
    assert len(fragment.encode()) <= 30 * 1024


@pytest.mark.asyncio
async def test_a_preview_that_is_not_an_image_is_dropped_and_the_task_goes_on(pushed, caplog):
    ledger = Ledger()
    previews = make_previews(ledger)
    with caplog.at_level(logging.WARNING, logger="servers.previews"):
        previews.offer(ledger.task, "3", type4(ledger.ours, image=b"\x89PNG not really"))
        await until(lambda: "cannot be read" in caplog.text)
    assert str(ledger.task.pk) in caplog.text and pushed == []
    assert ledger.prompts.tasks[ledger.ours] is ledger.task
    previews.offer(ledger.task, "3", type4(ledger.ours))  # the next good frame still goes out
    await until(lambda: pushed)
    assert decoded(pushed[0][1])[0] == "WEBP"


@pytest.mark.asyncio
async def test_a_huge_preview_is_refused_without_being_decoded(pushed, caplog):
    ledger = Ledger()
    with caplog.at_level(logging.WARNING, logger="servers.previews"):
        make_previews(ledger).offer(ledger.task, "3", type4(ledger.ours, image=png(size=(5000, 5000))))
        await until(lambda: "too large" in caplog.text)
    assert pushed == []


@pytest.mark.asyncio
@pytest.mark.parametrize("switch", ["server previews off", "PREVIEW_FPS 0"])
async def test_previews_switched_off_push_nothing(pushed, switch):
    ledger = Ledger()
    previews = make_previews(ledger, **({"fps": 0} if switch == "PREVIEW_FPS 0" else {"previews": False}))
    for _ in range(3):
        previews.offer(ledger.task, "3", type4(ledger.ours))
    await asyncio.sleep(0.3)
    assert pushed == [] and ledger.prompts.previews == {}


@pytest.mark.asyncio
async def test_a_burst_of_frames_sends_the_first_and_then_the_newest(pushed):
    ledger = Ledger()
    previews = make_previews(ledger, fps=5)

    def offer(red):
        previews.offer(ledger.task, "3", type4(ledger.ours, image=png(size=(8, 8), color=(red, 0, 0))))

    offer(10)
    await until(lambda: pushed)
    for red in range(20, 101, 10):  # nine more while the first has just gone out
        offer(red)
    await until(lambda: len(pushed) >= 2)
    await asyncio.sleep(0.5)
    assert len(pushed) == 2  # the first at once, then only the newest of the burst, 1/fps later

    def red(fact):
        with Image.open(io.BytesIO(base64.b64decode(fact["data"]))) as picture:
            return picture.convert("RGB").getpixel((4, 4))[0]

    assert abs(red(pushed[0][1]) - 10) < 8 and abs(red(pushed[1][1]) - 100) < 8


# --- what a prompt asks a server about previews --------------------------------------------------------------------


@pytest.fixture
def sim_factory():
    started = []

    def start(**options):
        sim = SimulatorThread(time_scale=0.01, preview_method="auto", **options).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("version", "server_previews", "method", "expected"),
    [
        ("0.5.1", True, "taesd", "taesd"),
        ("0.5.1", True, None, "auto"),
        ("0.5.1", False, "taesd", "none"),
        ("0.3.64", True, "taesd", None),
    ],
)
def test_what_the_server_receives_about_previews(
    sim_factory, hub, alice_api, workflows, version, server_previews, method, expected
):
    sim = sim_factory(comfyui_version=version)
    server = Server.objects.create(name="gpu-a", base_url=sim.url, previews=server_previews)
    if method is not None:
        workflows["fast"].preview_method = method
        workflows["fast"].save()
    wait_for(
        lambda: Server.objects.filter(pk=server.pk, state=ServerState.ONLINE, comfyui_version=version).exists(),
        message="the server to be online with its version known",
    )
    reply = alice_api.submit("fast", {})
    assert reply.status_code == 201, reply.content
    task_id = reply.json()["id"]
    wait_for(lambda: alice_api.task(task_id)["status"] == "succeeded", message="the task to succeed")
    prompt_id = Task.objects.get(pk=task_id).prompt_id
    [item] = [entry["prompt"] for entry in httpx.get(f"{sim.url}/history/{prompt_id}").json().values()]
    extra_data = item[3]
    assert extra_data.get("preview_method") == expected
    assert "preview_method" in extra_data if expected else "preview_method" not in extra_data


def test_version_strings():
    assert previews_module.supports_preview_method("0.5.0")
    assert previews_module.supports_preview_method("v0.10.2")
    assert previews_module.supports_preview_method("1.0")
    assert not previews_module.supports_preview_method("0.3.64")
    assert not previews_module.supports_preview_method("")
    assert not previews_module.supports_preview_method("nightly")
