"""The dispatch policy as plain data: fair share, capability, earliest finish, pipelining, affinity."""

from datetime import UTC, datetime, timedelta

from servers.dispatch import (
    Candidate,
    Slot,
    fair_order,
    missing_requirements,
    plan,
    plan_naive,
    summarize_object_info,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}}}
CAPS = {"classes": {"EmptyImage": {}, "SaveImage": {}}}


def task(n, owner, priority=0, graph=GRAPH, pinned=None):
    return Candidate(f"t{n}", owner, priority, T0 + timedelta(seconds=n), graph, pinned)


def slot(pk, weight=1.0, depth=2, limit=3, in_flight=0, backlog=0.0, running_left=0.0, caps=CAPS, **extra):
    return Slot(pk, f"gpu-{pk}", weight, depth, limit, in_flight, running_left, backlog, caps, **extra)


def ids(sends):
    return [(candidate.task_id, chosen.server_id) for candidate, chosen, _ in sends]


def test_users_take_turns_whatever_order_they_submitted_in():
    batch = [task(n, owner="a") for n in range(5)] + [task(10, owner="b"), task(11, owner="c")]
    order = [c.task_id for c in fair_order(batch, {})]
    assert order[:3] == ["t0", "t10", "t11"]
    assert order[3:] == ["t1", "t2", "t3", "t4"]


def test_the_least_served_user_goes_first_and_priority_before_all():
    batch = [task(1, "a"), task(2, "b"), task(3, "c", priority=5)]
    order = [c.task_id for c in fair_order(batch, {"a": 0, "b": 0, "c": 9})]
    assert order[0] == "t3"  # priority beats fair share
    order = [c.task_id for c in fair_order(batch[:2], {"a": 3, "b": 0})]
    assert order == ["t2", "t1"]


def test_servers_are_kept_at_their_pipeline_depth():
    result = plan([task(n, "a") for n in range(10)], [slot(1), slot(2)], {})
    assert sorted(server for _, server in ids(result.sends)) == [1, 1, 2, 2]


def test_a_user_with_nothing_running_jumps_to_the_front():
    busy = slot(1, in_flight=2, backlog=1.5, running_left=0.5)
    result = plan([task(1, "a"), task(2, "b")], [busy], {"a": 2})
    assert ids(result.sends) == [("t2", 1)]
    [(_, _, front)] = result.sends
    assert front  # sent to the front of the server's queue, behind only the running job


def test_a_slow_server_is_not_given_work_a_fast_one_finishes_sooner():
    fast = slot(1, weight=4.0, in_flight=2, backlog=1.5, running_left=0.5)
    slow = slot(2, weight=1.0)
    result = plan([task(1, "a")], [fast, slow], {"a": 2})
    assert result.sends == []  # it waits for the fast server's next slot
    # With a long queue, the slow server is worth feeding too.
    result = plan([task(n, "a") for n in range(12)], [fast, slow], {"a": 2})
    assert 2 in [server for _, server in ids(result.sends)]


def test_outstanding_work_of_other_clients_counts():
    shared = slot(1, backlog=6.0, running_left=1.0)  # six prompts of someone else wait there
    idle = slot(2)
    result = plan([task(1, "a")], [shared, idle], {})
    assert ids(result.sends) == [("t1", 2)]


def test_a_task_goes_only_where_its_nodes_and_models_are():
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "9": {"class_type": "SaveImage", "inputs": {}},
    }
    def caps(*files):
        return {"classes": {"CheckpointLoaderSimple": {"ckpt_name": list(files)}, "SaveImage": {}}}

    with_model, without = caps("sd_xl_base_1.0.safetensors"), caps("v1-5-pruned-emaonly.safetensors")
    result = plan([task(1, "a", graph=graph)], [slot(1, caps=without), slot(2, caps=with_model)], {})
    assert ids(result.sends) == [("t1", 2)]
    result = plan([task(1, "a", graph=graph)], [slot(1, caps=without), slot(2, caps=CAPS)], {})
    assert result.sends == []
    reason = result.waiting["t1"]
    assert "gpu-1 lacks model files sd_xl_base_1.0.safetensors" in reason
    assert "gpu-2 lacks node types CheckpointLoaderSimple" in reason


def test_no_server_online_is_said():
    result = plan([task(1, "a")], [slot(1, accepting=False, state="offline")], {})
    assert result.waiting == {"t1": "waiting: no server is online (gpu-1 offline)"}


def test_a_draining_pool_is_not_called_offline():
    draining = [slot(1, accepting=False, state="draining"), slot(2, accepting=False, state="draining")]
    result = plan([task(1, "a")], draining, {})
    assert result.waiting["t1"].startswith("waiting: every server is draining")
    assert "online" not in result.waiting["t1"]
    mixed = [slot(1, accepting=False, state="draining"), slot(2, accepting=False, state="offline")]
    result = plan([task(1, "a")], mixed, {})
    assert result.waiting == {"t1": "waiting: no server is taking new tasks (gpu-1 draining; gpu-2 offline)"}


def test_a_pinned_task_goes_to_its_server():
    result = plan([task(1, "a", pinned=2)], [slot(1), slot(2, backlog=1.0, in_flight=1, running_left=1.0)], {})
    assert ids(result.sends) == [("t1", 2)]


def test_servers_of_other_workers_count_but_are_not_sent_to():
    theirs = slot(1, weight=4.0, local=False)
    mine = slot(2)
    result = plan([task(1, "a")], [theirs, mine], {})
    assert result.sends == []  # the other worker's faster server will take it


def test_the_per_user_limit_holds_tasks_back_with_a_reason():
    result = plan([task(1, "a"), task(2, "b")], [slot(1, depth=5, limit=5)], {"a": 4}, user_limit=4)
    assert ids(result.sends) == [("t2", 1)]
    assert "the most one user may have at once" in result.waiting["t1"]


def test_object_info_summary_keeps_classes_and_model_files():
    info = {
        "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.ckpt"], {}]}}},
        "KSampler": {"input": {"required": {"sampler_name": [["euler", "ddim"], {}]}}},
        "NewStyle": {"input": {"optional": {"lora": ["COMBO", {"options": ["x.safetensors"]}]}}},
    }
    summary = summarize_object_info(info)
    assert summary == {
        "classes": {
            "CheckpointLoaderSimple": {"ckpt_name": ["a.safetensors", "b.ckpt"]},
            "KSampler": {},  # sampler names are not model files
            "NewStyle": {"lora": ["x.safetensors"]},
        }
    }
    assert missing_requirements(GRAPH, {}) == ["its node types are not known yet"]


def test_tasks_sharing_an_upload_follow_each_other_within_one_plan():
    batch = [Candidate(f"t{n}", "a", 0, T0 + timedelta(seconds=n), GRAPH, None, ("upload:x",)) for n in range(4)]
    result = plan(batch, [slot(1, depth=4, limit=4), slot(2, depth=4, limit=4)], {})
    assert len({server for _, server in ids(result.sends)}) == 1


def test_the_naive_policy_feeds_only_idle_servers_in_turn():
    result, turn = plan_naive([task(n, "a") for n in range(5)], [slot(1), slot(2, in_flight=1), slot(3)])
    assert [(c.task_id, s.server_id) for c, s, _ in result.sends] == [("t0", 1), ("t1", 3)]
    assert turn == 3
