import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from websockets.asyncio.client import connect

from bench.hubs import TreeCommands, drop_database, hub_environment, source_trees
from bench.management.commands.bench_engine import Database, row_id, stamp
from bench.simulators import SimulatorProcesses
from comfyhub.harness import free_port, healthy, percentile, stop, wait_until

ROOT = Path(settings.BASE_DIR)
GRAPH = json.loads((ROOT / "workflows" / "fast.json").read_text())["graph"]

SETUP = """
import json
from django.contrib.auth import get_user_model
from django.core.management import call_command
from tasks.models import ApiToken
call_command("add_server", "gpu-1", {url!r}, max_in_flight={max_in_flight}, verbosity=0)
call_command("load_workflow", demo=True, verbosity=0)
user = get_user_model().objects.create_user("burst")
print(json.dumps(ApiToken.issue(user)[1]))
"""


def graph(color):
    tiny = json.loads(json.dumps(GRAPH))
    tiny["1"]["inputs"]["color"] = color  # another input each time: ComfyUI would answer a repeat from its cache
    return tiny


class Command(TreeCommands, BaseCommand):
    help = (
        "Tiny jobs on one simulated ComfyUI server (in a process of its own), straight to it and through a hub "
        "(in processes of its own) in one run: a burst of --jobs prompts from the first sent to the last ended, "
        "and one job from its submission to its output's bytes in hand (--singles of them, one at a time). The "
        "hub's figures against the server's own show what the hub's cycle costs the GPU."
    )

    def add_arguments(self, parser):
        parser.add_argument("--jobs", type=int, default=50)
        parser.add_argument("--singles", type=int, default=20)
        parser.add_argument("--max-in-flight", type=int, default=8, help="The server's max_in_flight in the hub")
        parser.add_argument("--old-checkout", help="Source tree of another hub to run the same against, after")

    def handle(self, **options):
        if options["jobs"] < 1 or options["singles"] < 1 or options["max_in_flight"] < 1:
            raise CommandError("--jobs, --singles and --max-in-flight must be at least 1.")
        self.options = options
        postgres = connection.vendor == "postgresql" and bool(settings.REDIS_URL)
        trees = source_trees(ROOT, options["old_checkout"])
        sims = SimulatorProcesses(1, 1, time_scale=0, cwd=ROOT)
        try:
            url = sims.urls[0]
            direct = asyncio.run(self.direct(url))
            self.stdout.write(
                f"straight to the server: {options['jobs']} jobs in {direct['burst'] * 1000:.0f} ms "
                f"({direct['burst'] / options['jobs'] * 1000:.1f} ms a job); one job to its output's bytes p50 "
                f"{direct['single_p50']:.1f} ms, p99 {direct['single_p99']:.1f} ms"
            )
            with tempfile.TemporaryDirectory(prefix="comfyhub-bench-burst-") as scratch:
                for n, (label, tree) in enumerate(trees):
                    hub = self.through_hub(Path(scratch) / f"v{n}", n, tree, url, postgres)
                    self.stdout.write(
                        f"through the hub ({label}, {'PostgreSQL + Redis' if postgres else 'SQLite + in-memory'}, "
                        f"max_in_flight {options['max_in_flight']}): {options['jobs']} jobs in "
                        f"{hub['burst'] * 1000:.0f} ms, x{hub['burst'] / direct['burst']:.2f} the server's own "
                        f"time (target 1.2); one job to its output's bytes p50 {hub['single_p50']:.1f} ms, "
                        f"x{hub['single_p50'] / direct['single_p50']:.2f} (target 1.3), p99 "
                        f"{hub['single_p99']:.1f} ms"
                    )
        finally:
            sims.stop()

    # --- straight to ComfyUI -------------------------------------------------------------------------------

    async def direct(self, url):
        client_id = uuid.uuid4().hex
        ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        ended = {}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http, connect(ws_url, max_size=None) as ws:

            async def listen():
                async for frame in ws:
                    if isinstance(frame, str):
                        message = json.loads(frame)
                        data = message.get("data") or {}
                        if message.get("type") == "executing" and data.get("node") is None:
                            ended.setdefault(data.get("prompt_id"), asyncio.get_running_loop().create_future())
                            ended[data["prompt_id"]].set_result(time.time())

            listener = asyncio.create_task(listen())

            def waiter(prompt_id):
                return ended.setdefault(prompt_id, asyncio.get_running_loop().create_future())

            async def post(color):
                prompt_id = str(uuid.uuid4())
                waiter(prompt_id)
                reply = await http.post("/prompt", json={"prompt": graph(color), "client_id": client_id,
                                                         "prompt_id": prompt_id})
                reply.raise_for_status()
                return prompt_id

            singles = []
            for n in range(self.options["singles"] + 1):  # the first one warms up, and is not counted
                started = time.time()
                prompt_id = await post(100 + n)
                await waiter(prompt_id)
                entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
                image = entry["outputs"]["2"]["images"][0]
                (await http.get("/view", params=image)).raise_for_status()
                if n:
                    singles.append((time.time() - started) * 1000)
            started = time.time()
            ids = [await post(10_000 + n) for n in range(self.options["jobs"])]
            ends = [await waiter(prompt_id) for prompt_id in ids]
            listener.cancel()
        return {"burst": max(ends) - started, "single_p50": statistics.median(singles),
                "single_p99": percentile(singles, 99)}

    # --- through a hub -------------------------------------------------------------------------------------

    def through_hub(self, scratch, n, tree, url, postgres):
        scratch.mkdir(parents=True)
        self.tree, self.scratch, self.processes = tree, scratch, []
        self.env, db_url = hub_environment(
            scratch, tree, f"bench_burst_{os.getpid()}_{n}", postgres, COMFYHUB_USER_MAX_IN_FLIGHT="0"
        )
        database = None
        try:
            self.manage("migrate", "--verbosity", "0")
            setup = SETUP.format(url=url, max_in_flight=self.options["max_in_flight"])
            token = json.loads(self.manage("shell", "-c", setup).strip().splitlines()[-1])
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            if postgres:
                self.start("serve", "--port", str(port), "--no-supervisor")
                self.start("run_upstream")
            else:
                self.start("serve", "--port", str(port))
            wait_until(lambda: healthy(base), 60, "the hub to start", error=CommandError)
            database = Database(db_url)
            online = "SELECT count(*) FROM servers_server WHERE state = 'online'"
            wait_until(lambda: database.one(online)[0] >= 1, 60, "the server online", error=CommandError)
            return asyncio.run(self.hub_load(base, token, database, postgres))
        finally:
            for process in self.processes:
                stop(process)
            if database is not None:
                database.close()
            if postgres:
                drop_database(db_url)

    async def hub_load(self, base, token, database, postgres):
        opts = self.options
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as api:

            async def submit(color):
                reply = await api.post("/api/v1/tasks", json={"workflow": "fast", "inputs": {"color": color}})
                if reply.status_code != 201:
                    raise CommandError(f"a submission was refused: {reply.status_code} {reply.text[:300]}")
                return reply.json()["id"]

            singles = []
            for n in range(opts["singles"] + 1):  # the first one warms up, and is not counted
                started = time.time()
                task_id = await submit(200 + n)
                while True:  # what an integrator without a websocket does: ask until it has ended
                    body = (await api.get(f"/api/v1/tasks/{task_id}")).json()
                    if body["status"] in ("succeeded", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.002)
                if body["status"] != "succeeded":
                    raise CommandError(f"a task did not succeed: {body['error']}")
                (await api.get(body["outputs"][0]["url"])).raise_for_status()
                if n:
                    singles.append((time.time() - started) * 1000)
            started = time.time()
            ids = await asyncio.gather(*(submit(20_000 + n) for n in range(opts["jobs"])))
            rows = [row_id(task_id, postgres) for task_id in ids]
            marks = ", ".join("?" for _ in rows)
            query = f"SELECT count(*) FROM tasks_task WHERE status = 'succeeded' AND id IN ({marks})"  # noqa: S608
            deadline = time.monotonic() + 120
            while database.one(query, *rows)[0] < len(rows):
                if time.monotonic() > deadline:
                    raise CommandError("the burst did not end within 120 s")
                await asyncio.sleep(0.01)
            last = database.one(f"SELECT max(finished_at) FROM tasks_task WHERE id IN ({marks})", *rows)[0]  # noqa: S608
        return {"burst": stamp(last) - started, "single_p50": statistics.median(singles),
                "single_p99": percentile(singles, 99)}
