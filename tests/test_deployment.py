"""
The production layout of deploy/ started on this machine: two Daphne processes and two `manage.py run_upstream`
workers (the commands of deploy/Procfile) on a PostgreSQL database, a Redis channel layer and an S3 bucket
(SeaweedFS), with two simulated ComfyUI servers. nginx is left out: the test talks to each Daphne process directly,
which is what nginx balances between (deploy/README.md).

It is the many-hosts layout of deploy/README.md: each process (and the admin's `manage.py` commands) has a disk of
its own, MEDIA_ROOT and STATIC_ROOT included, so that the database, Redis and the bucket are all they share. A file
that one of them wrote to its own disk instead of the bucket would be missing for the others, and is looked for.

Two Daphne processes can only share pushes through Redis, so the test brings its own PostgreSQL database and
Redis key prefix in both CI passes (on the SQLite pass too). It never touches pytest's database: it creates a
database of its own and drops it at the end. The processes' logs are in tmp_path and failure messages end with
their tails.
"""

import ast
import hashlib
import logging
import os
import re
import secrets
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from websockets.sync.client import connect

from comfyhub.harness import free_port
from comfyhub.object_storage import S3_VARIABLES
from comfyhub.seaweed import SeaweedServer
from comfysim import SimulatorThread
from tests.deployment_layout import (
    HOSTS,
    PROXIED,
    ROOT,
    SUBMISSIONS,
    TIME_SCALE,
    USERS_SCRIPT,
    Layout,
    files_under,
    forget_keys,
    get,
    host_disk,
    leases,
    log_in,
    manage,
    manage_on,
    png,
    postgres_url,
    procfile,
    query,
    redis_url,
    transitions,
)
from tests.storage.conftest import objects

logger = logging.getLogger(__name__)


def test_the_production_layout_runs_tasks(tmp_path):
    suffix = secrets.token_hex(4)
    database = f"comfyhub_deploy_{suffix}"
    db_url = postgres_url(database)
    prefix = f"comfyhub-deploy-{suffix}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COMFYHUB_", "REDIS_"))},
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url(),
        "REDIS_PREFIX": prefix,
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DEBUG": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "COMFYHUB_EMBEDDED_SUPERVISOR": "false",
        "COMFYHUB_PRODUCTION": "true",
        "PYTHONUNBUFFERED": "1",  # log lines reach the files at once
    }
    on = {host: host_disk(tmp_path, host) for host in HOSTS}
    layout = Layout(env, tmp_path)
    with ExitStack() as stack:
        query(postgres_url("postgres"), f'CREATE DATABASE "{database}"')
        stack.callback(query, postgres_url("postgres"), f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        stack.callback(forget_keys, env["REDIS_URL"], prefix)
        s3 = stack.enter_context(SeaweedServer(tmp_path / "seaweed"))
        env.update(s3.env)
        sims = [stack.enter_context(SimulatorThread(time_scale=TIME_SCALE, name=f"sim-{i}")) for i in (1, 2)]
        stack.callback(layout.stop_all)

        # The deploy steps of deploy/README.md (migrate once, from one host; collectstatic on each web host), then
        # the pool, the workflows and two users.
        clock = time.monotonic()
        admin = {**env, **on["admin"]}
        manage(admin, ("migrate", "--no-input", "-v0"))
        logger.info("migrated in %.1fs", time.monotonic() - clock)
        manage_on(
            ({**env, **on["web-1"]}, ("collectstatic", "--no-input", "-v0")),
            ({**env, **on["web-2"]}, ("collectstatic", "--no-input", "-v0")),
            (admin, ("add_server", "gpu-1", sims[0].url)),
            (admin, ("add_server", "gpu-2", sims[1].url)),
            (admin, ("load_workflow", "--demo")),
            (admin, ("shell", "-c", USERS_SCRIPT)),
        )
        for host in ("web-1", "web-2"):
            assert (Path(on[host]["STATIC_ROOT"]) / "admin" / "css" / "base.css").is_file()
        servers = {
            name: (pk, client_id)
            for pk, name, client_id in query(db_url, "SELECT id, name, client_id FROM servers_server")
        }
        sim_of = {"gpu-1": sims[0], "gpu-2": sims[1]}

        # Two Daphne processes and two upstream workers, as deploy/Procfile runs them.
        logger.info("set up in %.1fs", time.monotonic() - clock)
        clock = time.monotonic()
        commands = procfile()
        ports = [free_port(), free_port()]
        for n, port in ((1, str(ports[0])), (2, str(ports[1]))):
            argv = [port if arg == "$PORT" else arg for arg in commands["web"]]
            layout.start(f"web-{n}", argv, PORT=port, **on[f"web-{n}"])
        workers = [layout.start(f"upstream-{n}", commands["upstream"], **on[f"upstream-{n}"]) for n in (1, 2)]
        alice_token, bob_token = (
            out.strip() for out in manage(admin, ("create_token", "alice"), ("create_token", "bob"))
        )
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        apis = {
            (user, n): httpx.Client(base_url=base, headers={**PROXIED, "Authorization": f"Bearer {token}"}, timeout=10)
            for user, token in (("alice", alice_token), ("bob", bob_token))
            for n, base in ((1, bases[0]), (2, bases[1]))
        }
        for client in apis.values():
            stack.callback(client.close)

        for base in bases:
            layout.wait(
                lambda base=base: (r := get(f"{base}/readyz")) and r.status_code == 200, f"{base}/readyz", timeout=45
            )
        logger.info("both Daphne processes ready %.1fs after the start", time.monotonic() - clock)
        # The first worker up may take both; it hands one to the second as soon as that one runs.
        owners = layout.wait(
            lambda: (held := leases(db_url)) and len(held) == 2 and len(set(held.values())) == 2 and held,
            "the two workers to lease one server each",
        )
        worker_of = {}
        for name, (pk, client_id) in servers.items():
            pid = int(owners[pk].rsplit(":", 2)[1])  # an owner is "<hostname>:<pid>:<hex>"
            [worker_of[name]] = [worker for worker in workers if worker.pid == pid]
            sim = sim_of[name]
            layout.wait(
                lambda sim=sim, client_id=client_id: any(
                    c.startswith(f"{client_id}.") for c in sim.call(sim.sim.connected_clients)
                ),
                f"the lease holder to connect to {name}",
            )
        for worker in workers:
            assert re.search(r"Upstream supervisor \S+ running", worker.text()), worker.tail()

        logger.info("both servers leased and connected %.1fs after the start", time.monotonic() - clock)
        # Alice's browser on Daphne #2 follows what she submits through Daphne #1.
        session = log_in(bases[1], "alice", "alice-pass-123")
        socket_ = stack.enter_context(
            connect(
                f"ws://127.0.0.1:{ports[1]}/ws/tasks/",
                additional_headers={"Cookie": f"sessionid={session}"},
                origin=f"https://127.0.0.1:{ports[1]}",  # the page's origin, behind the proxy
                open_timeout=10,
            )
        )
        owner_of = {}
        for index, (user, n) in enumerate(SUBMISSIONS):
            reply = apis[user, n].post("/api/v1/tasks", json={"workflow": "invert", "inputs": {"color": 4000 + index}})
            assert reply.status_code == 201, reply.text
            owner_of[reply.json()["id"]] = user
        watched = next(iter(owner_of))  # alice's first, through Daphne #1
        # An image alice uploads through Daphne #1 and uses through Daphne #2: a worker on a third host sends it.
        image = png((12, 200, 80))
        upload = apis["alice", 1].post("/api/v1/uploads", files={"image": ("leaf.png", image, "image/png")})
        assert upload.status_code == 201, upload.text
        uploaded = upload.json()
        scale = {"workflow": "upload-scale", "inputs": {"image": uploaded["id"]}}
        refused = apis["bob", 1].post("/api/v1/tasks", json=scale)  # not bob's to use
        assert refused.status_code == 400 and "image" in refused.text, refused.text
        reply = apis["alice", 2].post("/api/v1/tasks", json=scale)
        assert reply.status_code == 201, reply.text
        owner_of[reply.json()["id"]] = "alice"

        frames = []
        succeeded_row = re.compile(rf'id="task-{watched}" data-status="succeeded"')

        def pushed():
            try:
                frames.append(socket_.recv(timeout=0.5))
            except TimeoutError:
                return False
            return succeeded_row.search(frames[-1])

        layout.wait(pushed, "Daphne #2 to push the success of a task submitted through Daphne #1", timeout=30)
        assert any(f'id="task-{watched}"' in frame and "afterbegin:#task-list" in frame for frame in frames), frames

        def finished():
            bodies = {
                task_id: apis[user, 1].get(f"/api/v1/tasks/{task_id}").json() for task_id, user in owner_of.items()
            }
            return all(body["status"] in ("succeeded", "failed", "cancelled") for body in bodies.values()) and bodies

        tasks = layout.wait(finished, "every task to finish", timeout=30)
        assert query(db_url, "SELECT count(*) FROM tasks_task") == [(len(owner_of),)]  # bob's refusal made none
        logger.info("every task finished %.1fs after the start", time.monotonic() - clock)
        for task in tasks.values():
            assert task["status"] == "succeeded", (task, layout.describe())

        # Each server's work was done by the worker holding its lease: that process sent it and followed it, no
        # other process wrote a word about it once it had a server, and the server ran it once.
        assert leases(db_url) == owners, f"the leases changed hands in a steady layout\n{layout.describe()}"
        for task_id, task in tasks.items():
            holder = worker_of[task["server"]]
            lines = transitions(holder, task_id)
            assert {line["to"] for line in lines} >= {"submitted", "running", "succeeded"}, (lines, holder.tail())
            assert all(line["server"] == task["server"] for line in lines), lines
            for process in layout.processes:
                if process is not holder:
                    assert all(line["server"] == "-" for line in transitions(process, task_id)), process.tail()
            for name, sim in sim_of.items():
                ran = sim.sim.executed_prompt_ids.count(task["prompt_id"])
                assert ran == (1 if name == task["server"] else 0), (task, name, ran)
        assert {task["server"] for task in tasks.values()} <= set(servers)

        # Outputs download from either Daphne process, the same bytes; another user's are a 404 there too.
        for task_id, task in tasks.items():
            user, other = owner_of[task_id], "bob" if owner_of[task_id] == "alice" else "alice"
            [output] = task["outputs"]
            for n in (1, 2):
                reply = apis[user, n].get(output["url"])
                assert reply.status_code == 200, reply.text
                assert len(reply.content) == output["size"]
                assert hashlib.sha256(reply.content).hexdigest() == output["sha256"]
                assert apis[other, n].get(output["url"]).status_code == 404

        # A thumbnail made on demand by Daphne #1 is the one Daphne #2 serves: both read and write the bucket.
        [output] = tasks[watched]["outputs"]
        browser = {**PROXIED, "Cookie": f"sessionid={session}"}
        thumbs = [httpx.get(f"{base}/outputs/{output['id']}/thumb", headers=browser, timeout=10) for base in bases]
        assert [thumb.status_code for thumb in thumbs] == [200, 200], thumbs[0].text
        assert thumbs[0].content == thumbs[1].content and thumbs[0].content.startswith(b"\xff\xd8")

        # Every file is in the bucket, the bytes recorded; no host wrote one to its own disk.
        stored = objects(s3)
        rows = query(
            db_url,
            "SELECT file, size, sha256 FROM tasks_taskoutput UNION ALL SELECT file, size, sha256 FROM tasks_upload",
        )
        assert len(rows) == len(tasks) + 1
        for name, size, sha256 in rows:
            assert name in stored, (name, sorted(stored))
            assert (len(stored[name]), hashlib.sha256(stored[name]).hexdigest()) == (size, sha256), name
        assert hashlib.sha256(image).hexdigest() == uploaded["sha256"]
        assert f"thumbs/{watched}/{output['id']}.jpg" in stored
        for host in HOSTS:
            assert files_under(on[host]["MEDIA_ROOT"]) == [], f"{host} wrote to its own MEDIA_ROOT"

        for base in bases:
            assert get(f"{base}/healthz").status_code == 200
            ready = get(f"{base}/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json() == {"database": "ok", "channel_layer": "ok", "storage": "ok"}

        # SIGINT (deploy/systemd's KillSignal for run_upstream) stops a worker cleanly: it gives its leases back.
        for worker in workers:
            worker.interrupt()
        for worker in workers:
            assert worker.stop() == 0, worker.tail()
            assert re.search(r"upstream supervisor \S+ stopped", worker.text()), worker.tail()
        assert query(db_url, "SELECT owner FROM servers_lock WHERE purpose = 'upstream'") == []


def settings_variables():
    """The environment variables comfyhub/settings.py reads: os.environ.get(...), os.environ[...], env_*(...)."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "comfyhub" / "settings.py").read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            if ast.unparse(node.func) in ("os.environ.get", "os.getenv") or ast.unparse(node.func).startswith("env_"):
                names.add(node.args[0].value)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            names.add(ast.literal_eval(node.slice))
    # STORAGES comes from comfyhub/object_storage.py, which reads the bucket's variables.
    return names | {"COMFYHUB_S3_BUCKET", *S3_VARIABLES}


def test_env_example_lists_every_variable_the_settings_read():
    documented = set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", (ROOT / "deploy" / "env.example").read_text(), re.M))
    read = settings_variables()
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "COMFYHUB_LEASE_SECONDS"} <= read  # the parse finds them
    assert sorted(read - documented) == [], "add them to deploy/env.example, one comment line each"
